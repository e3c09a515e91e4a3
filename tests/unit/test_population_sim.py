"""Population simulation: reproducible, honours IIV, covariates and residual error."""

from __future__ import annotations

import numpy as np
import pytest

import hybridpk as hp
from hybridpk.errors import ModelError


def _design(n=200):
    return hp.make_design(n, [dict(TIME=0, AMT=100, CMT=1, ADDL=2, II=12)], [0.5, 1, 2, 4, 8, 12.5, 24, 30],
                          covariates={"WT": lambda rng, k: rng.uniform(40, 110, k)}, jitter=0.2, seed=3)


def test_same_seed_same_dataset_and_different_seed_differs():
    design = _design(20)
    kw = dict(typical=dict(CL=3.0, V=30.0, KA=1.2), omega=dict(CL=0.09, V=0.04), proportional=0.1)
    a = hp.simulate_population("1cmt_oral", design, seed=5, **kw)
    b = hp.simulate_population("1cmt_oral", design, seed=5, **kw)
    c = hp.simulate_population("1cmt_oral", design, seed=6, **kw)
    assert a.dataset == b.dataset
    assert not a.dataset.to_dataframe().DV.equals(c.dataset.to_dataframe().DV)


def test_iiv_covariate_and_residual_error_are_as_specified():
    design = _design(400)
    sim = hp.simulate_population("1cmt_oral", design, dict(CL=3.0, V=30.0, KA=1.2), dict(CL=0.09),
                                 proportional=0.1, covariates={"CL": ("WT", 70.0, 0.75)}, seed=11)
    par = sim.parameters
    wt = design.to_dataframe().groupby("ID").WT.first().loc[par.ID].to_numpy()
    eta = np.log(par.CL.to_numpy() / (3.0 * (wt / 70) ** 0.75))
    np.testing.assert_allclose(eta, sim.etas.ETA_CL.to_numpy(), rtol=1e-10)
    assert 0.07 < eta.var() < 0.11
    np.testing.assert_allclose(par.V, 30.0)             # no IIV on V
    df = sim.dataset.to_dataframe()
    obs = sim.dataset.observation_mask
    ratio = df.DV.to_numpy()[obs] / sim.ipred.IPRED.to_numpy()[obs] - 1
    assert 0.09 < ratio.std() < 0.11
    assert sim.dataset.n_doses == 3 * 400


def test_unknown_parameter_is_refused():
    with pytest.raises(ModelError, match="no parameter"):
        hp.simulate_population("1cmt_oral", _design(3), dict(CL=3.0, V=30.0, KA=1.0, VMAX=3.0))


def test_a_virtual_population_cycles_the_design_in_chunks():
    """virtual_design: patient i takes template i mod 2 (its dosing, sampling and WT), IDs start+1..start+n.
    simulate_population_chunks: IDs 1..n in order over the chunks, the same seed and chunk size give the same
    population, and the ETAs have the variances asked for (n = 4000: SE of a variance about 2.2%)."""
    from hybridpk.solve import simulate_population_chunks, virtual_design

    design = _design(2)
    df = design.to_dataframe()
    v = virtual_design(design, 10, 5)
    vd = v.to_dataframe()
    assert list(v.ids) == [11, 12, 13, 14, 15]
    for pid, template in zip(v.ids, [1, 2, 1, 2, 1]):
        mine, theirs = vd[vd.ID == pid], df[df.ID == template]
        assert mine.TIME.tolist() == theirs.TIME.tolist() and mine.WT.tolist() == theirs.WT.tolist()
    kw = dict(typical=dict(CL=3.0, V=30.0, KA=1.2), omega=dict(CL=0.09, V=0.04), proportional=0.1)
    chunks = list(simulate_population_chunks("1cmt_oral", design, 4000, chunk=1500, seed=2, **kw))
    assert [c.dataset.n_subjects for c in chunks] == [1500, 1500, 1000]
    ids = np.concatenate([np.asarray(c.dataset.ids) for c in chunks])
    assert ids.tolist() == list(range(1, 4001))
    again = list(simulate_population_chunks("1cmt_oral", design, 4000, chunk=1500, seed=2, **kw))
    assert all(a.dataset == b.dataset for a, b in zip(chunks, again))
    etas = np.concatenate([c.etas[["ETA_CL", "ETA_V"]].to_numpy() for c in chunks])
    assert etas.var(0) == pytest.approx([0.09, 0.04], rel=0.08)
    assert abs(np.corrcoef(etas.T)[0, 1]) < 0.05
    with pytest.raises(ModelError, match="at least 1"):
        next(simulate_population_chunks("1cmt_oral", design, 0, **kw))


def test_a_table_is_written_chunk_by_chunk_and_appears_only_when_complete(tmp_path):
    """TableWriter: CSV (header once) and Parquet give back the concatenated chunks; an exception inside the
    block leaves no file and no temporary file; a chunk with other columns is refused."""
    import pandas as pd

    from hybridpk.io import TableWriter

    parts = [pd.DataFrame({"ID": [i, i], "DV": [0.5 * i, 1.5]}) for i in range(1, 4)]
    whole = pd.concat(parts, ignore_index=True)
    for name in ("t.csv", "t.parquet"):
        with TableWriter(tmp_path / name) as w:
            for p in parts:
                w.write(p)
        back = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        pd.testing.assert_frame_equal(back, whole, check_dtype=False)
        assert w.rows == 6
    with pytest.raises(RuntimeError):
        with TableWriter(tmp_path / "broken.csv") as w:
            w.write(parts[0])
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet"]
    with pytest.raises(ValueError, match="columns"):
        with TableWriter(tmp_path / "mixed.csv") as w:
            w.write(parts[0])
            w.write(parts[1].rename(columns={"DV": "CONC"}))
