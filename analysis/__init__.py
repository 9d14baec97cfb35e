"""Turn a study's MLflow runs into tables, figures and a report (`sdd analyze`).

Modules: `runs` reads the runs back into pandas tables, `stats` decides every claim, `verdicts`
states the study's claims (one `Verdict` per curve) through it, `summary` computes thresholds, phases
and the other numbers behind the headline answers, `figures` draws them and `report` writes everything out;
the command line entry is `sdd analyze` (sdd/cli.py). Import is cheap: pandas, matplotlib and mlflow
load on use.
"""
