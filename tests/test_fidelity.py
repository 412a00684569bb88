"""The fidelity check of the attribution estimates (docs/method.md section 6a) on constructed losses
whose estimates and switch-offs are known in closed form: one linear in every component's scale
(the estimate is exact: sets' summed estimates equal their deltas, rho and sign agreement are 1)
and one quadratic (it is not), each with the figures the report shows; the probes' choice, the
rank correlation and the sign agreement against naive computations; and through the ablation
stage on a tiny LLaMA, against the alpha definition computed in the test in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from sparcom.ablation.fidelity import (
    choose_probes,
    fidelity_dataset,
    measures_fidelity,
    probe_records,
    probe_sets,
    rank_correlation,
    sign_agreement,
)
from sparcom.ablation.report import ablation_markdown, fidelity_markdown, fidelity_summary
from sparcom.ablation.settings import AblationSettings
from sparcom.identification.schema import FAMILIES

from builders import HELD_OUT, make_record
from references import reference_tokens

NEURONS = FAMILIES[0]
LAYERS, WIDTH = (3, 7), 6  # true layer indices of the family's two layers
LABELS = np.array(["CLS"] * 4 + ["MATH"] * 4 + ["QA"] * 3)
GROUPS, EVALUATED = ["CLS", "MATH"], ["CLS", "MATH", "QA"]


def naive_ranks(values: np.ndarray) -> np.ndarray:
    """1 + the number of smaller values + half the number of other equal ones."""
    return np.array([1 + (values < v).sum() + 0.5 * ((values == v).sum() - 1) for v in values])


def naive_spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = naive_ranks(x), naive_ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def naive_sign_agreement(x: np.ndarray, y: np.ndarray) -> float:
    return sum((a > 0 and b > 0) or (a < 0 and b < 0) or (a == 0 and b == 0) for a, b in zip(x, y)) / len(x)


class Constructed:
    """Per record r a loss over the components' scales alpha (1 intact, 0 switched off):
    linear:    L_r = b_r + sum_c g_rc alpha_c          estimate -dL/dalpha_c = -g_rc, exact;
    quadratic: L_r = b_r + (sum_c g_rc alpha_c)^2 / 2  estimate -S_r g_rc, S_r = sum_c g_rc,
               while switching c off changes L_r by -S_r g_rc + g_rc^2 / 2."""

    def __init__(self, kind: str, seed: int):
        rng = np.random.default_rng(seed)
        self.kind = kind
        self.g = rng.normal(size=(len(LABELS), len(LAYERS), WIDTH))
        self.b = rng.uniform(1, 3, len(LABELS))

    def loss(self, alpha: np.ndarray) -> np.ndarray:
        inner = (self.g * alpha).sum(axis=(1, 2))
        return self.b + (inner if self.kind == "linear" else inner ** 2 / 2)

    def nll_without(self, mask: np.ndarray) -> np.ndarray:
        return self.loss(1.0 - mask)

    def estimates(self) -> xr.DataArray:
        s = self.g.sum(axis=(1, 2))[:, None, None]
        values = -self.g if self.kind == "linear" else -s * self.g
        return xr.DataArray(values.astype(np.float32), dims=("instruction", "layer", "neuron"),
                            coords={"layer": list(LAYERS)})

    def delta_of_one(self, layer: int, neuron: int) -> float:
        mask = np.zeros((len(LAYERS), WIDTH), dtype=bool)
        mask[layer, neuron] = True
        return float((self.nll_without(mask) - self.loss(np.ones((len(LAYERS), WIDTH)))).mean())


def sets() -> dict[str, xr.DataArray]:
    masks = np.zeros((2, len(LAYERS), WIDTH), dtype=bool)
    masks[0, 0, :3] = masks[0, 1, 5] = True
    masks[1, 1, 1:4] = True
    return {g: xr.DataArray(m, dims=("layer", "neuron")) for g, m in zip(GROUPS, masks)}


def measured(case: Constructed, settings: AblationSettings, on: list[int] | None = None) -> xr.Dataset:
    """The fidelity variables beside delta and ablated_size as the ablation writes them (computed
    here), the probes measured on the records `on` (None: all), NaN on the others."""
    base = case.loss(np.ones((len(LAYERS), WIDTH)))
    off_probe_records = np.ones(len(LABELS), dtype=bool)
    off_probe_records[list(range(len(LABELS)) if on is None else on)] = False
    probes = probe_sets(case.estimates().isel(instruction=list(np.flatnonzero(~off_probe_records))), settings)
    probe_base = np.where(off_probe_records, np.nan, base)
    fidelity = fidelity_dataset(NEURONS, sets(), LABELS, EVALUATED, case.estimates(), probes, probe_base,
                                [np.where(off_probe_records, np.nan, case.nll_without(mask)) for mask in probes],
                                settings)
    delta = [[float((case.nll_without(sets()[a].values) - base)[LABELS == e].mean()) for e in EVALUATED]
             for a in GROUPS]
    return fidelity.merge(xr.Dataset(
        {"delta": (("ablated", "evaluated"), delta),
         "ablated_size": ("ablated", [int(sets()[g].sum()) for g in GROUPS])},
        coords={"ablated": GROUPS, "evaluated": EVALUATED}))


def probe_places(dataset: xr.Dataset) -> list[tuple[int, int]]:
    return [(LAYERS.index(int(layer)), int(neuron))
            for layer, neuron in zip(dataset.probe_layer.values, dataset.probe_neuron.values)]


SETTINGS = AblationSettings(fidelity_probes=8, resamples=300)


def test_a_linear_loss_is_estimated_exactly():
    case = Constructed("linear", 0)
    dataset = measured(case, SETTINGS)
    np.testing.assert_allclose(dataset.set_estimate.values, dataset.delta.values, atol=1e-6)
    np.testing.assert_allclose(dataset.probe_estimate.values, dataset.probe_delta.values, atol=1e-6)
    for k, (layer, neuron) in enumerate(probe_places(dataset)):
        assert dataset.probe_delta.values[k] == pytest.approx(case.delta_of_one(layer, neuron))
    assert float(dataset.fidelity_rank_correlation) == pytest.approx(1.0)
    assert float(dataset.fidelity_sign_agreement) == 1.0
    np.testing.assert_allclose(dataset.fidelity_sign_agreement_ci.values, [1.0, 1.0])
    text = fidelity_markdown(fidelity_summary(dataset))
    assert "Spearman's rho = 1.00 [1.00, 1.00], sign agreement = 1.00 [1.00, 1.00]" in text
    assert "the estimates rank these components' effects (the interval lies above 0)" in text
    own = f"{float(dataset.set_estimate.sel(ablated='CLS', evaluated='CLS')):.3f}"
    other = f"{float(dataset.set_estimate.sel(ablated='CLS', evaluated='MATH')):.3f}"
    # the set's estimate and delta, both exact; others: MATH alone (QA has no components)
    assert f"| CLS | 4 | {own} | {own} | {other} | {other} |" in text


def test_a_quadratic_loss_is_not_and_the_figures_say_how_far():
    case = Constructed("quadratic", 1)
    dataset = measured(case, SETTINGS)
    places = probe_places(dataset)
    s = case.g.sum(axis=(1, 2))
    estimate = np.array([(-s * case.g[:, layer, neuron]).mean() for layer, neuron in places])
    delta = np.array([case.delta_of_one(layer, neuron) for layer, neuron in places])
    np.testing.assert_allclose(dataset.probe_estimate.values, estimate, rtol=1e-6)
    np.testing.assert_allclose(dataset.probe_delta.values, delta, rtol=1e-9)
    # the estimate misses each switch-off by the mean of g^2 / 2, so sets' estimates fall short
    for k, (layer, neuron) in enumerate(places):
        assert delta[k] - estimate[k] == pytest.approx((case.g[:, layer, neuron] ** 2 / 2).mean(), rel=1e-5)
    assert (dataset.set_estimate < dataset.delta).all()
    rho, agreement = naive_spearman(estimate, delta), naive_sign_agreement(estimate, delta)
    assert float(dataset.fidelity_rank_correlation) == pytest.approx(rho)
    assert float(dataset.fidelity_sign_agreement) == pytest.approx(agreement)
    assert agreement < 1  # the constructed case really disagrees somewhere
    summary = fidelity_summary(dataset)
    text = fidelity_markdown(summary)
    assert f"Spearman's rho = {rho:.2f} [" in text and f"sign agreement = {agreement:.2f} [" in text
    low, high = dataset.fidelity_rank_correlation_ci.values
    assert low <= rho <= high
    first = summary["probes"][0]
    assert f"| layer {LAYERS[places[0][0]]}, neuron {places[0][1]} | {estimate[0]:.3f} | {delta[0]:.3f} |" in text
    assert first["place"] == {"layer": LAYERS[places[0][0]], "neuron": places[0][1]}


def test_the_probe_records_are_the_first_of_each_group():
    # LABELS: CLS at 0-3, MATH at 4-7, QA at 8-10
    assert probe_records(LABELS, 2) == [0, 1, 4, 5, 8, 9]
    assert probe_records(LABELS, 3) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert probe_records(LABELS, 4) is None  # every record: the stage's own intact pass serves
    assert probe_records(LABELS, None) is None


def test_probes_on_a_part_of_the_records_compare_estimate_and_delta_there():
    """Quadratic loss: the estimate and the delta of a probe differ from record to record, so the
    means over the probe records differ from the means over all records."""
    case = Constructed("quadratic", 2)
    on = [0, 1, 4, 5, 8, 9]
    dataset = measured(case, SETTINGS, on)
    s = case.g.sum(axis=(1, 2))
    base = case.loss(np.ones((len(LAYERS), WIDTH)))
    for k, (layer, neuron) in enumerate(probe_places(dataset)):
        mask = np.zeros((len(LAYERS), WIDTH), dtype=bool)
        mask[layer, neuron] = True
        assert float(dataset.probe_delta[k]) == pytest.approx(float((case.nll_without(mask) - base)[on].mean()))
        assert float(dataset.probe_estimate[k]) == pytest.approx(float((-s * case.g[:, layer, neuron])[on].mean()),
                                                                rel=1e-6)
    off = np.setdiff1d(np.arange(len(LABELS)), on)
    assert np.isnan(dataset.probe_nll.values[:, off]).all() and np.isfinite(dataset.probe_nll.values[:, on]).all()
    assert np.isnan(dataset.probe_nll_base.values[off]).all()
    # the sets' estimates still average every record of the evaluated group
    own = (-s[:, None, None] * case.g * sets()["CLS"].values).sum(axis=(1, 2))[LABELS == "CLS"].mean()
    assert float(dataset.set_estimate.sel(ablated="CLS", evaluated="CLS")) == pytest.approx(own, rel=1e-6)
    assert "each estimated and measured on the same 6 records" in fidelity_markdown(fidelity_summary(dataset))


def test_the_probes_are_the_strongest_of_both_signs():
    mean = np.array([5.0, -1.0, 4.0, 0.0, 3.0, -2.0, 2.0, 1.0, 0.5, -0.25, 6.0, 7.0])
    chosen = choose_probes(mean, 6, np.random.default_rng(0))
    positive, negative = chosen[mean[chosen] > 0], chosen[mean[chosen] < 0]
    assert len(positive) == 3 and len(negative) == 3 and len(set(chosen.tolist())) == 6
    assert set(positive) <= {11, 10, 0, 2, 4, 6}          # the 2 x 3 strongest positive
    assert set(negative.tolist()) == {5, 1, 9}             # all three negative ones
    assert 3 not in chosen                                 # a zero estimate is no probe
    # one sign short: the other fills the places; none at all of either: empty
    assert sorted(choose_probes(np.array([1.0, 2.0, 3.0, -1.0]), 4, np.random.default_rng(1)).tolist()) == [0, 1, 2, 3]
    assert len(choose_probes(np.zeros(5), 4, np.random.default_rng(0))) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlation_and_sign_agreement_against_naive(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, 15).astype(float)  # ties and zeros on purpose
    y = x + rng.normal(size=15) * 2
    y[:3] = 0.0
    assert rank_correlation(x, y) == pytest.approx(naive_spearman(x, y))
    assert sign_agreement(x, y) == pytest.approx(naive_sign_agreement(x, y))
    assert np.isnan(rank_correlation(np.ones(4), y[:4]))


def test_when_fidelity_is_measured():
    assert measures_fidelity("attribution_contrastive", AblationSettings())
    assert measures_fidelity("attribution", AblationSettings())
    assert not measures_fidelity("contrastive", AblationSettings())
    assert measures_fidelity("lape", AblationSettings(fidelity=True))
    assert not measures_fidelity("attribution", AblationSettings(fidelity=False))
    # the comparison's tuned model: only where asked for
    assert not measures_fidelity("attribution_contrastive", AblationSettings().for_tuned_model())
    assert measures_fidelity("attribution_contrastive", AblationSettings(fidelity=True).for_tuned_model())
    assert AblationSettings(seeds=3).for_tuned_model().seeds == 3


def test_the_ablation_report_carries_the_section_only_when_measured():
    dataset = measured(Constructed("linear", 2), SETTINGS)
    summary = {"groups": [], "controls_run": [], "per_group": {}, "delta": {"CLS": {"CLS": 0.1}},
               "fidelity": fidelity_summary(dataset)}
    assert "### Fidelity of the attribution estimates" in ablation_markdown(summary, plot=None)
    del summary["fidelity"]
    assert "Fidelity" not in ablation_markdown(summary, plot=None)


# --- on a tiny model, through the ablation stage ---------------------------------------------------------

def alpha_reference(model, tokenizer, record, k: int, off: tuple[int, int] | None = None):
    """The alpha definition in float64, one record: every neuron's input of down_proj scaled by
    alpha (1 intact); L the mean NLL of the first k response tokens. Returns (-dL/dalpha for every
    neuron [layer, neuron], L with the neuron `off` at alpha 0 minus L intact)."""
    ids, first = reference_tokens(record, tokenizer, "response")
    ids = ids[:first + k]
    mlps = [layer.mlp for layer in model.model.layers]
    alpha = torch.ones(len(mlps), mlps[0].down_proj.in_features, dtype=torch.float64, requires_grad=True)

    def loss(scale: torch.Tensor) -> torch.Tensor:
        handles = [mlp.down_proj.register_forward_pre_hook(lambda _, args, j=j: (args[0] * scale[j],))
                   for j, mlp in enumerate(mlps)]
        try:
            logits = model(torch.tensor([ids])).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        return -torch.log_softmax(logits[first - 1:-1], -1).gather(1, torch.tensor(ids[first:])[:, None]).mean()

    intact = loss(alpha)
    (gradient,) = torch.autograd.grad(intact, alpha)
    changed = None
    if off is not None:
        with torch.no_grad():
            switched = torch.ones_like(alpha)
            switched[off] = 0
            changed = float(loss(switched) - intact)
    return -gradient.numpy(), changed


def test_the_ablation_measures_fidelity_on_the_model(tmp_path, identified, tiny_llama_dir, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparcom.ablation.ablate import run_ablation
    from sparcom.extraction.settings import ExtractionSettings

    work, store, components, held_out = identified
    settings = AblationSettings(eval_dataset=held_out, seeds=1, resamples=50, permutations=50, controls=["random"],
                                max_response_tokens=3, fidelity=True, fidelity_probes=4, fidelity_per_group=1)
    result = xr.open_zarr(run_ablation(components, store, settings, ExtractionSettings(max_batch_size=4),
                                       cache_dir, tmp_path)).load()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    by_id = {r.id: r for r in (make_record(100 + i, *texts) for i, texts in enumerate(HELD_OUT))}
    records = [by_id[i] for i in result.instruction_id.values]
    estimates = np.stack([alpha_reference(model, tokenizer, r, 3)[0] for r in records])
    scale = np.abs(estimates).max()
    assert result.sizes["probe"] == 4
    # the probes' records: the first of each category
    categories = result.category.values
    on = [i for i in range(len(records)) if categories[i] not in categories[:i]]
    assert len(on) < len(records)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(result.probe_nll_base.values)), on)
    for k in range(4):
        place = (int(result.probe_layer[k]), int(result.probe_neuron[k]))  # tiny LLaMA: layers 0, 1, 2
        measured = [alpha_reference(model, tokenizer, records[i], 3, off=place)[1] for i in on]
        assert abs(float(result.probe_delta[k]) - np.mean(measured)) < 1e-4
        assert abs(float(result.probe_estimate[k]) - estimates[on, place[0], place[1]].mean()) < 1e-4 * scale
    chosen = xr.open_zarr(components).isn.load()
    for group in result.ablated.values:
        summed = (estimates * chosen.sel(group=group).values).sum(axis=(1, 2))
        for evaluated in result.evaluated.values:
            expected = summed[categories == evaluated].mean()
            got = float(result.set_estimate.sel(ablated=group, evaluated=evaluated))
            assert abs(got - expected) < 1e-4 * scale * max(1, int(chosen.sel(group=group).sum()))
    assert result.set_estimate.attrs["meaning"].startswith("mean over the evaluated group's records")


def test_an_attribution_rule_from_its_store_to_the_fidelity_report(tmp_path, identified, tiny_llama_dir, cache_dir,
                                                                   sample_records):
    """The chain on a tiny LLaMA: the attribution store of the count store's records, the sets of
    attribution_contrastive from it (against NumPy on the stored estimates), the ablation with the
    fidelity check on by the rule, and its section in the report."""
    from sparcom.ablation.ablate import run_ablation
    from sparcom.ablation.report import report_ablation
    from sparcom.attribution.settings import AttributionSettings
    from sparcom.attribution.store import attribute_to_store
    from sparcom.core.models import load_model, resolve_model
    from sparcom.extraction.settings import ExtractionSettings
    from sparcom.identification.identify import identify_store
    from sparcom.identification.settings import IdentificationSettings

    work, store, _, held_out = identified
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float32", device="cpu")
    attribution = attribute_to_store(loaded, sample_records, tmp_path / "attr.zarr", AttributionSettings(),
                                     ExtractionSettings())
    settings = IdentificationSettings(rule="attribution_contrastive", epsilon=0.05, attribution=attribution)
    components = identify_store(store, settings, work / "runs" / "tiny-attribution")
    estimates = xr.open_zarr(attribution).load()
    chosen = xr.open_zarr(components).load()
    categories = np.array(estimates.category.values.tolist())
    means = np.stack([estimates.act_attribution.values[categories == g].astype(np.float64).mean(axis=0)
                      for g in chosen.group.values])
    for g in range(len(means)):
        margin = means[g] - np.delete(means, g, axis=0).max(axis=0)
        ordered = np.sort(margin.ravel())[::-1]
        m = int(np.ceil(0.05 * margin.size - 1e-9))
        np.testing.assert_array_equal(chosen.isn.values[g], (margin >= ordered[m - 1]) & (margin > 0))
    np.testing.assert_allclose(chosen.attribution_mean.values, means, rtol=1e-12, atol=1e-15)
    out = tmp_path / "ablation"
    path = run_ablation(components, store, AblationSettings(eval_dataset=held_out, seeds=1, resamples=50,
                                                            permutations=50, controls=["random"],
                                                            max_response_tokens=3, fidelity_probes=4),
                        ExtractionSettings(max_batch_size=4), cache_dir, out)
    summary = report_ablation(path, out)
    assert len(summary["fidelity"]["probes"]) == 4
    text = (out / "ablation.md").read_text()
    assert "### Fidelity of the attribution estimates" in text
    assert f"Spearman's rho = {summary['fidelity']['rank_correlation']['value']:.2f}" in text
