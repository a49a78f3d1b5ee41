from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/stencil.smk"
include: "rules/sample.smk"
include: "rules/train.smk"
include: "rules/embed.smk"
include: "rules/load.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        final_targets(),
