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
        # the mask is memory-mapped; the pyramid is built in blocks (1.1 GB peak at res 6 on GLOBE)
        mem_mb=mem_mb(2000),
        runtime=60,
    params:
        spec=MASK_SPEC.to_dict(),
        # extent_margin_km only crops the prepared layers
        stencil=CFG.stencil.to_params(exclude={"extent_margin_km"}),
    script:
        "../scripts/stencil.py"
