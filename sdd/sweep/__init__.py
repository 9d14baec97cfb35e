"""Studies: a study file's stages run as Ray Tune grids under one study run in MLflow.

`study_file` parses and validates the YAML file, `plan` turns a stage into trials (starting
checkpoints around the interpolation threshold), `lineage` holds the study and stage runs and their
trials record, `ray_runner` runs trials on Ray, and `run` ties them into `sdd sweep` and `sdd study`.
Importing the package is cheap: each module loads torch, mlflow and ray only where it uses them.
"""
