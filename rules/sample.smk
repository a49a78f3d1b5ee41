rule sample_triplets:
    input:
        unpack(model_layer_npys),
        land_mask=layer_npy("land_mask"),
        grids=[layer_grid(name) for name in ALL_LAYERS],
    output:
        results("samples", "shard-{i}.npz"),
    log:
        "logs/sample_triplets/{i}.log",
    benchmark:
        "benchmarks/sample_triplets/{i}.tsv"
    conda:
        "../envs/geo.yaml"
    resources:
        # layers are memory-mapped (pages touched count in RSS: 1.05 GB with the 933 MB GLOBE mask)
        mem_mb=mem_mb(2000),
        runtime=30,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        mask=MASK_SPEC.to_dict(),
        # not sample.shards: adding shards leaves the existing ones as they are
        sample=CFG.sample.to_params(exclude={"shards"}),
        bbox=sample_bbox(),
    script:
        "../scripts/sample_triplets.py"
