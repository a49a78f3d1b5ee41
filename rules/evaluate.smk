from vectorgeo import labels as vg_labels

EVAL_TASKS = {
    name: vg_labels.TaskSpec.from_task(name, task)
    for name, task in CFG.evaluate.tasks.items()
}
EVAL_RASTER_TASKS = [n for n, t in EVAL_TASKS.items() if t.type == "raster"]


rule prepare_eval_label:
    input:
        source=lambda wildcards: (
            storage(EVAL_TASKS[wildcards.task].source)
            if vg_sources.is_remote(EVAL_TASKS[wildcards.task].source)
            else local(vg_labels.raster_source(EVAL_TASKS[wildcards.task]))
        ),
    output:
        npy=results("eval", "labels", "{task}.npy"),
        grid=results("eval", "labels", "{task}.grid.json"),
    log:
        "logs/prepare_eval_label/{task}.log",
    benchmark:
        "benchmarks/prepare_eval_label/{task}.tsv"
    wildcard_constraints:
        task="|".join(EVAL_RASTER_TASKS) or "(?!)",
    conda:
        "../envs/geo.yaml"
    resources:
        mem_mb=mem_mb(2500),
        runtime=30,
    params:
        spec=lambda wildcards: EVAL_TASKS[wildcards.task].layer_spec().to_dict(),
        crop=crop_bbox(),
    script:
        "../scripts/prepare_layer.py"


rule evaluate:
    input:
        embeddings=embed_batch_targets,
        model=results("model", "model.pt"),
        model_metrics=results("model", "metrics.json"),
        layers=[layer_npy(name) for name in LAYER_SPECS],
        grids=[layer_grid(name) for name in LAYER_SPECS],
        # a raster task's prepared labels, or a vector task's file itself
        labels=[
            (
                results("eval", "labels", f"{name}.npy")
                if task.type == "raster"
                else local(str(vg_labels.vector_source_path(task)))
            )
            for name, task in EVAL_TASKS.items()
        ],
        # read beside each prepared label raster (and fetched with it from storage)
        label_grids=[
            results("eval", "labels", f"{name}.grid.json")
            for name in EVAL_RASTER_TASKS
        ],
    output:
        metrics=results("eval", "metrics.json"),
        report=results("eval", "report.html"),
    log:
        "logs/evaluate/evaluate.log",
    benchmark:
        "benchmarks/evaluate/evaluate.tsv"
    conda:
        "../envs/eval.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(3000, 0.5),
        runtime=30,
    params:
        layer_names=list(LAYER_SPECS),
        evaluate=CFG.evaluate.to_params(),
    script:
        "../scripts/evaluate.py"


FINAL_TARGETS.extend([results("eval", "metrics.json"), results("eval", "report.html")])
