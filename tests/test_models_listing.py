"""`loopscope models [--matched]` tables."""

from loopscope.models import FAMILIES, PRESETS, effective_depth, param_counts, preset
from loopscope.models.listing import MATCH_KINDS, matched_table, models_table


def test_models_table_lists_every_preset_and_family():
    table = models_table()
    assert list(table["preset"]) == list(PRESETS)
    assert set(table["family"]) == set(FAMILIES)
    row = table.set_index("preset").loc["parcae-140m"]
    assert row["params_unique"] == 144_323_136 == param_counts(preset("parcae-140m")).unique
    assert row["effective_depth"] == effective_depth(preset("parcae-140m")) == 20
    assert row["kv_bytes_per_token"] == 2 * 768 * 20 * 2
    assert row["kv_bytes_per_token_last_loop"] == 2 * 768 * 6 * 2
    assert (table["flops_per_token_train"] > table["flops_per_token_forward"]).all()


def test_matched_table_pairs_and_labels():
    table = matched_table(context=512)
    assert set(table["match"]) <= set(MATCH_KINDS)
    pairs = {(r.match, r.looped, r.dense) for r in table.itertuples()}
    assert ("iso-param", "parcae-tiny", "gpt-tiny") in pairs
    assert ("iso-FLOP", "parcae-tiny", "gpt-tiny-l12") in pairs
    assert ("iso-FLOP", "looped-tiny-k1", "gpt-tiny-l12") in pairs
    assert ("iso-param", "parcae-1.3b", "gpt-1.3b") in pairs
    assert ("iso-param", "parcae-tiny", "gpt-tiny-l12") not in pairs
    for r in table.itertuples():  # a label is only given within tolerance
        ratio = {"iso-param": r.params_ratio, "iso-FLOP": r.flops_ratio_forward, "iso-memory": r.memory_ratio,
                 "iso-memory (last-loop)": r.memory_ratio_last_loop}[r.match]
        assert abs(ratio - 1) <= 0.10
        assert PRESETS[r.looped].vocab_size == PRESETS[r.dense].vocab_size
    # the per-loop KV cache grows with context: at long context parcae-140m is no longer iso-memory
    long = matched_table(context=8192)
    assert not ((long["match"] == "iso-memory") & (long["looped"] == "parcae-140m")).any()


def test_models_table_names_each_difference_from_the_official_model():
    from loopscope.models.listing import fidelity_flags, models_table

    table = models_table().set_index("preset")
    assert table.loc["rdm-huginn-micro", "fidelity"] == "-"
    assert "QK-norm on (Huginn: off)" in table.loc["rdm-micro", "fidelity"]
    assert "no sqrt(d) embedding scale" in table.loc["rdm-micro", "fidelity"]
    assert "answer token only" in table.loc["looped-osu-micro", "fidelity"]
    assert fidelity_flags(preset("rdm-micro").replace(injection="add", sandwich_norm=False))[-2:] == [
        "add injection (Huginn: concat)", "no sandwich norms (Huginn: on)"]
    assert not any("attention mixture" in p.lower() or "dram" in p.lower() for p in table.index)


def test_looped_families_share_one_loop_skeleton():
    import inspect

    from loopscope.models.looped import Looped
    from loopscope.models.parcae import Parcae
    from loopscope.models.rdm import RDM
    from loopscope.models.recurrence import LoopedLM

    for cls in (Parcae, RDM, Looped):
        assert issubclass(cls, LoopedLM) and "forward" not in vars(cls)
        assert "run_loops" not in inspect.getsource(inspect.getmodule(cls))
