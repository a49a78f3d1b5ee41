checkpoint stencil:
    input:
        mask=layer_npy("land_mask"),
        grid=layer_grid("land_mask"),
    output:
        manifest=results("stencil", "manifest.json"),
        regions=directory(results("stencil", "regions")),
    log:
        "logs/stencil/stencil.log",
    benchmark:
        "benchmarks/stencil/stencil.tsv"
    conda:
        "../envs/geo.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        spec=MASK_SPEC.to_dict(),
        resolution=config["stencil"]["resolution"],
        region_resolution=config["stencil"]["region_resolution"],
        prune_resolution=config["stencil"]["prune_resolution"],
        extent=config["stencil"]["extent"],
    script:
        "../scripts/stencil.py"
