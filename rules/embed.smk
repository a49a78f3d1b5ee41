ROLLUP_TARGETS = expand(
    results("embeddings", "rollup", "res{p}.parquet"), p=CFG.embed.rollup_resolutions
)


rule cut_windows:
    input:
        unpack(model_layer_npys),
        grids=[layer_grid(name) for name in LAYER_SPECS],
    output:
        [results("windows", f"{region}.npz") for region in WINDOW_REGIONS],
    log:
        "logs/cut_windows/cut_windows.log",
    benchmark:
        "benchmarks/cut_windows/cut_windows.tsv"
    conda:
        "../envs/geo.yaml"
    resources:
        # layers are memory-mapped; one window at a time is in memory
        mem_mb=mem_mb(2000),
        runtime=120,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        # the widest patch the model reads: the local patch times the largest context scale
        patch_km=CFG.sample.patch_km * max(CFG.sample.scales),
    script:
        "../scripts/cut_windows.py"


rule embed_batch:
    input:
        # each region's window of each layer, not the world (vectorgeo.windows), and its stencil cells
        unpack(embed_batch_inputs),
        # rewritten with their layers: what reruns every batch when a layer changes (the windows are ancient)
        grids=[layer_grid(name) for name in LAYER_SPECS],
        model=results("model", "model.pt"),
    output:
        # one {region}_{digest}.parquet per region of the batch (vectorgeo.regionfiles)
        batch=directory(results("embeddings", "batches", "{batch}")),
    log:
        "logs/embed_batch/{batch}.log",
    benchmark:
        "benchmarks/embed_batch/{batch}.tsv"
    conda:
        "../envs/torch.yaml"
    # CPU: embed.cpu_threads model threads per job; CUDA: the other cores gather patches for the GPU
    threads: 4 if cuda_requested(CFG.embed.device) else CFG.embed.cpu_threads
    resources:
        gpu=1 if cuda_requested(CFG.embed.device) else 0,
        # torch and the model, one region's window (uncompressed) and embeddings at a time
        mem_mb=mem_mb_per_file(1500, 2.0, files_at_once=1),
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        layers={name: spec.to_dict() for name, spec in LAYER_SPECS.items()},
        # batch_size and device are execution settings: the script reads them from the config,
        # so that changing them does not rerun every batch
        embed=CFG.embed.to_params(include={"max_nodata_frac"}),
    script:
        "../scripts/embed_batch.py"


rule rollup:
    input:
        batches=embed_batch_targets,
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
        mem_mb=mem_mb(2000),
        runtime=60,
    params:
        resolutions=CFG.embed.rollup_resolutions,
    script:
        "../scripts/rollup.py"


FINAL_TARGETS.extend([*ROLLUP_TARGETS, results("embeddings", "rollup", "summary.json")])


rule build_tiles:
    input:
        batches=embed_batch_targets,
    output:
        archive=results("tiles", "cells.pmtiles"),
    log:
        "logs/build_tiles/build_tiles.log",
    benchmark:
        "benchmarks/build_tiles/build_tiles.tsv"
    conda:
        "../envs/db.yaml"
    resources:
        # the cells' ids and colours, the rollup sums of one region at a time
        mem_mb=mem_mb(1500, 0.5),
        runtime=60,
    params:
        max_features=CFG.serve.tile_max_features,
    script:
        "../scripts/build_tiles.py"


FINAL_TARGETS.append(rules.build_tiles.output.archive)
