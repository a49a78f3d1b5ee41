rule mosaic_layer:
    input:
        tiles=layer_tiles,
    output:
        results("layers", "{layer}.mosaic.tif"),
    log:
        "logs/mosaic_layer/{layer}.log",
    benchmark:
        "benchmarks/mosaic_layer/{layer}.tsv"
    conda:
        "../envs/geo.yaml"
    resources:
        mem_mb=mem_mb(2000),
        runtime=120,
    script:
        "../scripts/mosaic_layer.py"


rule prepare_layer:
    input:
        source=layer_source,
    output:
        npy=results("layers", "{layer}.npy"),
        grid=results("layers", "{layer}.grid.json"),
    log:
        "logs/prepare_layer/{layer}.log",
    benchmark:
        "benchmarks/prepare_layer/{layer}.tsv"
    conda:
        "../envs/geo.yaml"
    resources:
        # GeoTIFFs are read in row blocks; built-ins (e.g. the 933 MB GLOBE mask) whole
        mem_mb=mem_mb(2000, 0.5),
        runtime=60,
    params:
        spec=lambda wildcards: ALL_LAYERS[wildcards.layer].to_dict(),
        crop=crop_bbox(),
    script:
        "../scripts/prepare_layer.py"
