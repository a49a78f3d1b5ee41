def train_on_cuda():
    """Whether train.device resolves to CUDA, decided without importing torch.

    ``auto`` means CUDA when an NVIDIA driver on this machine lists a GPU (and
    CUDA_VISIBLE_DEVICES does not hide it); set ``train.device: cuda`` when jobs
    are submitted from a host without a GPU.
    """
    device = config["train"]["device"]
    if device != "auto":
        return device.startswith("cuda")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    # the NVIDIA driver lists one folder per GPU here (a system path, not workflow data)
    gpus = os.path.join(os.sep, "proc", "driver", "nvidia", "gpus")
    return os.path.isdir(gpus) and len(os.listdir(gpus)) > 0


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
        gpu=1 if train_on_cuda() else 0,
        mem_mb=4000,
        runtime=60,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        patch_px=config["sample"]["patch_px"],
        patch_km=config["sample"]["patch_km"],
        model=config["model"],
        train=config["train"],
    script:
        "../scripts/train.py"


FINAL_TARGETS.extend(rules.train_model.output)
