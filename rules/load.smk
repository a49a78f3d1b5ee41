rule load_regions:
    input:
        # every region of the run in one job (one start-up, a few connections): regions whose file the
        # database already holds (same checksum and rows) are skipped, regions no file names are removed
        embeddings=embed_batch_targets,
    output:
        summary=results("loaded", "regions.json"),
    log:
        "logs/load_regions/load_regions.log",
    benchmark:
        "benchmarks/load_regions/load_regions.tsv"
    conda:
        "../envs/db.yaml"
    # regions loaded at once, each in its own transaction over its own connection
    threads: 2
    resources:
        db=2,
        # one region's arrays and COPY stream per thread: the largest region file, twice
        mem_mb=mem_mb_per_file(500, 4.0, files_at_once=2),
        runtime=120,
    params:
        # the database the rows go to (the URL itself, which may hold a password, is read at run time)
        database=CFG.database.to_params(include={"home", "port", "dbname"}),
    script:
        "../scripts/load_regions.py"


rule build_index:
    input:
        # after the stencil checkpoint, like load_regions: a stencil rerun that leaves every region as it
        # was then reruns neither job (a plain input would be planned while load_regions still waited for it)
        loaded=lambda wildcards: after_stencil(rules.load_regions.output.summary),
    output:
        summary=results("loaded", "index.json"),
    log:
        "logs/build_index/index.log",
    benchmark:
        "benchmarks/build_index/index.tsv"
    conda:
        "../envs/db.yaml"
    resources:
        db=2,
        mem_mb=mem_mb(1000),
        runtime=120,
    params:
        database=CFG.database.to_params(
            include={
                "hnsw_m",
                "hnsw_ef_construction",
                "maintenance_work_mem",
                "hnsw_storage",
                "index_build_workers",
            }
        ),
    script:
        "../scripts/build_index.py"


FINAL_TARGETS.append(rules.build_index.output.summary)
