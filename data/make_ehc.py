"""Generate data/ehc.csv (and ehc.truth.csv): the bundled enterohepatic-recirculation example.

    python data/make_ehc.py

200 patients, one 100 mg oral dose, 8-12 samples each over 24 h; every other patient recirculates
(gallbladder emptying at meals 4 h and 10 h after the dose). See hybridpk.solve.examples.
"""

from pathlib import Path

from hybridpk.solve.examples import simulate_ehc_population

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    ds, truth = simulate_ehc_population(200, seed=2026)
    ds.to_dataframe().to_csv(HERE / "ehc.csv", index=False)
    truth.to_csv(HERE / "ehc_truth.txt", index=False)   # not a dataset: no .csv
    print(f"wrote {HERE / 'ehc.csv'} ({ds.n_subjects} subjects, {ds.n_observations} observations)")
