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
        mem_mb=3000,
        runtime=30,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        mask=MASK_SPEC.to_dict(),
        sample={
            k: v
            for k, v in config["sample"].items()
            if k not in ("shards", "per_shard")
        },
        per_shard=config["sample"]["per_shard"],
        bbox=sample_bbox(),
    script:
        "../scripts/sample_triplets.py"
