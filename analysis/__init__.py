"""Turn a study's MLflow runs into tables, figures and a report (`sdd analyze`).

Modules: `runs` reads the runs back into pandas tables, `summary` computes thresholds, phases and
the numbers behind the headline answers, `figures` draws them, `report` writes everything out and
`cli` is the command line entry. Import is cheap: pandas, matplotlib and mlflow load on use.
"""
