rule train_model:
    input:
        shards=sample_shards(),
    output:
        model=results("model", "model.pt"),
        metrics=results("model", "metrics.json"),
        plot=results("model", "training.png"),
    log:
        "logs/train_model/train.log",
    benchmark:
        "benchmarks/train_model/train.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        gpu=1 if cuda_requested(CFG.train.device) else 0,
        # shards are streamed (vectorgeo.shards): memory does not grow with their number
        mem_mb=mem_mb(3000),
        runtime=60,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        sample={
            **CFG.sample.to_params(include={"patch_px", "patch_km"}),
            "scales": list(CFG.sample.scales),
        },
        model=CFG.model.to_params(),
        train=CFG.train.to_params(),
    script:
        "../scripts/train.py"


FINAL_TARGETS.extend(rules.train_model.output)
