EMBED = config["embed"]  # checked by config/schema.yaml

if any(p > config["stencil"]["resolution"] for p in EMBED["rollup_resolutions"]):
    raise WorkflowError(
        "invalid configuration: config key 'embed.rollup_resolutions': "
        f"{EMBED['rollup_resolutions']} must not be finer than stencil.resolution "
        f"({config['stencil']['resolution']})"
    )

ROLLUP_TARGETS = expand(
    results("embeddings", "rollup", "res{p}.parquet"), p=EMBED["rollup_resolutions"]
)


def embed_on_cuda():
    """Whether embed.device resolves to CUDA, decided without importing torch (as for training)."""
    device = EMBED["device"]
    if device != "auto":
        return device == "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and len(os.listdir(gpus)) > 0


def stencil_region(wildcards):
    """A region's stencil file, once the stencil checkpoint has run.

    ancient(): the checkpoint rewrites every region file when it reruns; the digest in the
    output name is what decides whether a region's cells changed.
    """
    checkpoints.stencil.get()
    return ancient(results("stencil", "regions", f"{wildcards.region}.parquet"))


rule embed_region:
    input:
        unpack(model_layer_npys),
        grids=[layer_grid(name) for name in LAYER_SPECS],
        stencil=stencil_region,
        model=results("model", "model.pt"),
    output:
        results("embeddings", "{region}_{digest}.parquet"),
    log:
        "logs/embed_region/{region}_{digest}.log",
    benchmark:
        "benchmarks/embed_region/{region}_{digest}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1 if embed_on_cuda() else 0,
        mem_mb=4000,
        runtime=120,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        max_nodata_frac=EMBED["max_nodata_frac"],
    script:
        "../scripts/embed_region.py"


rule rollup:
    input:
        regions=lambda wildcards: region_targets(
            results("embeddings", "{region}_{digest}.parquet")
        ),
    output:
        rollups=ROLLUP_TARGETS,
        summary=results("embeddings", "rollup", "summary.json"),
    log:
        "logs/rollup/rollup.log",
    benchmark:
        "benchmarks/rollup/rollup.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        resolutions=EMBED["rollup_resolutions"],
    script:
        "../scripts/rollup.py"


FINAL_TARGETS.extend([*ROLLUP_TARGETS, results("embeddings", "rollup", "summary.json")])
