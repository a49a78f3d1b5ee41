"""Snakemake adapter: sample one shard of anchor / neighbor / distant triplets."""

from dataclasses import asdict

from vectorgeo.config import SampleConfig, section
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.sampling import TripletSampler

log = setup_logging(snakemake.log[0])
params = section(SampleConfig, snakemake.params.sample, "sample")
layers = {
    name: Layer.open(LayerSpec.from_dict(spec), snakemake.input[name]) for name, spec in snakemake.params.layers.items()
}
mask = Layer.open(LayerSpec.from_dict(snakemake.params.mask), snakemake.input.land_mask)
sampler = TripletSampler(layers, mask, params, bbox=snakemake.params.bbox)
shard = int(snakemake.wildcards.i)
stats = sampler.write_shard(snakemake.output[0], params.per_shard, params.seed, shard, progress=True)
log.info(
    "shard %d: %d triplets, acceptance %.3f (%d candidates) in %.1f s, %.0f triplets/s; rejections: %s",
    shard,
    stats.accepted,
    stats.acceptance,
    stats.candidates,
    stats.seconds,
    stats.accepted / stats.seconds,
    asdict(stats),
)
