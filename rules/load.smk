rule load_region:
    input:
        embeddings=results("embeddings", "{region}_{digest}.parquet"),
    output:
        marker=results("loaded", "{region}_{digest}.json"),
    log:
        "logs/load_region/{region}_{digest}.log",
    benchmark:
        "benchmarks/load_region/{region}_{digest}.tsv"
    conda:
        "../envs/db.yaml"
    resources:
        db=1,
        # the region's arrays and the COPY stream
        mem_mb=mem_mb(500, 4.0),
        runtime=30,
    params:
        # the database the rows go to (the URL itself, which may hold a password, is read at run time)
        database=CFG.database.to_params(include={"home", "port", "dbname"}),
    script:
        "../scripts/load_region.py"


rule build_index:
    input:
        markers=lambda wildcards: region_targets(
            results("loaded", "{region}_{digest}.json")
        ),
    output:
        summary=results("loaded", "index.json"),
    log:
        "logs/build_index/index.log",
    benchmark:
        "benchmarks/build_index/index.tsv"
    conda:
        "../envs/db.yaml"
    resources:
        db=1,
        mem_mb=mem_mb(1000),
        runtime=120,
    params:
        database=CFG.database.to_params(
            include={"hnsw_m", "hnsw_ef_construction", "maintenance_work_mem"}
        ),
    script:
        "../scripts/build_index.py"


FINAL_TARGETS.append(rules.build_index.output.summary)
