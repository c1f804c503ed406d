"""The seed equations of every cell, the served network and the ensemble fusion, checked against
independent computations: torch's own LSTM and GRU, and NumPy written from the notes."""

import numpy as np
import pytest
import torch
from torch import nn

from lstm_serve.model.model import CELLS, GatedLSTM, ModelConfig, ReferenceGRU, SequenceClassifier, combine_members


def random_classifier(seed: int, **overrides) -> SequenceClassifier:
    torch.manual_seed(seed)
    model = SequenceClassifier(ModelConfig(**{"input_dim": 5, "num_classes": 4, "hidden_size": 8, **overrides}))
    model.set_normalisation(torch.linspace(-1, 1, 5), torch.linspace(0.5, 2, 5))
    return model.eval()


def assert_same(ours, theirs, atol=1e-6):
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max().item() <= atol


def test_gated_lstm_equals_torch_lstm():
    torch.manual_seed(0)
    D, H, L, B, T = 6, 10, 3, 4, 13
    fused = nn.LSTM(D, H, L, batch_first=True)
    reference = GatedLSTM(D, H, L)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, T, D)
    state = (torch.randn(L, B, H), torch.randn(L, B, H))
    with torch.no_grad():
        expected_out, (expected_h, expected_c) = fused(x, state)
        out, (h, c) = reference(x, state)
    assert_same([out, h, c], [expected_out, expected_h, expected_c])


def test_reference_gru_equals_torch_gru():
    torch.manual_seed(1)
    D, H, L, B, T = 6, 10, 3, 4, 13
    fused = nn.GRU(D, H, L, batch_first=True)
    reference = ReferenceGRU(D, H, L)
    reference.load_state_dict(fused.state_dict())
    x, h0 = torch.randn(B, T, D), torch.randn(L, B, H)
    with torch.no_grad():
        expected_out, expected_h = fused(x, h0)
        out, (h,) = reference(x, (h0,))
    assert_same([out, h], [expected_out, expected_h])


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-a))


def numpy_lstm_variant(params: dict, variant: str, x: np.ndarray, h: np.ndarray, c: np.ndarray):
    """The notes' equations in float64 NumPy, one step and one layer at a time, separate gate matrices."""
    L, H = h.shape[0], h.shape[2]
    h, c = h.astype(np.float64).copy(), c.astype(np.float64).copy()
    outputs = []
    for t in range(x.shape[1]):
        inp = x[:, t].astype(np.float64)
        for k in range(L):
            W_x, W_h = params[f"weight_ih_l{k}"], params[f"weight_hh_l{k}"]
            b = params[f"bias_ih_l{k}"] + params[f"bias_hh_l{k}"]
            gate = {}
            names = ["f", "c", "o"] if variant == "coupled" else ["i", "f", "c", "o"]
            for n, name in enumerate(names):
                rows = slice(n * H, (n + 1) * H)
                gate[name] = inp @ W_x[rows].T + h[k] @ W_h[rows].T + b[rows]
            c_prev = c[k]
            if variant == "peephole":
                p_i, p_f, p_o = params[f"weight_peephole_l{k}"]
                i_t = sigmoid(gate["i"] + p_i * c_prev)
                f_t = sigmoid(gate["f"] + p_f * c_prev)
            elif variant == "coupled":
                f_t = sigmoid(gate["f"])
                i_t = 1 - f_t
            c_t = f_t * c_prev + i_t * np.tanh(gate["c"])
            o_t = sigmoid(gate["o"] + p_o * c_t) if variant == "peephole" else sigmoid(gate["o"])
            h[k], c[k] = o_t * np.tanh(c_t), c_t
            inp = h[k]
        outputs.append(inp.copy())
    return np.stack(outputs, axis=1), h, c


@pytest.mark.parametrize("variant", ["peephole", "coupled"])
def test_lstm_variants_equal_the_notes_equations_in_numpy(variant):
    torch.manual_seed(2)
    D, H, L, B, T = 5, 7, 2, 3, 11
    cell = GatedLSTM(D, H, L, variant=variant).eval()
    with torch.no_grad():  # peepholes large enough to matter
        for name, value in cell.named_parameters():
            if "peephole" in name:
                value.uniform_(-1.5, 1.5)
    x, h0, c0 = torch.randn(B, T, D), torch.randn(L, B, H), torch.randn(L, B, H)
    with torch.no_grad():
        out, (h, c) = cell(x, (h0, c0))
        plain = GatedLSTM(D, H, L)  # the variant must actually differ from the standard cell
    params = {name: value.detach().double().numpy() for name, value in cell.named_parameters()}
    expected_out, expected_h, expected_c = numpy_lstm_variant(params, variant, x.numpy(), h0.numpy(), c0.numpy())
    for ours, theirs in [(out, expected_out), (h, expected_h), (c, expected_c)]:
        assert np.abs(ours.numpy() - theirs).max() <= 1e-5
    assert sum(p.numel() for p in cell.parameters()) != sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_reaches_state_or_valid_logits(cell):
    model = random_classifier(1, cell=cell, num_layers=2)
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 5)
    x[1, 3:] = 1e3  # garbage in the padding must change nothing
    x[2, 5:] = -1e3
    with torch.no_grad():
        logits, state = model(x, lengths=lengths)
        assert len(state) == (1 if cell == "gru" else 2)
        for row, n in enumerate(lengths.tolist()):
            alone, state1 = model(x[row : row + 1, :n])
            assert torch.allclose(logits[row, :n], alone[0], atol=1e-6)
            for s, s1 in zip(state, state1, strict=True):
                assert torch.allclose(s[:, row], s1[:, 0], atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_streaming_in_chunks_equals_one_call(cell):
    model = random_classifier(2, cell=cell)
    x = torch.randn(2, 12, 5)
    with torch.no_grad():
        full, _ = model(x)
        state, parts = None, []
        for chunk in x.split([1, 4, 2, 5], dim=1):
            out, state = model(chunk, state)
            parts.append(out)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-6)


def test_last_step_picks_each_rows_last_valid_logit():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    picked = SequenceClassifier.last_step(logits, torch.tensor([4, 2]))
    assert torch.equal(picked, torch.stack([logits[0, 3], logits[1, 1]]))


@pytest.mark.parametrize("cell", CELLS)
def test_an_ensemble_is_exactly_the_mean_of_its_members_and_streams(cell):
    members = [random_classifier(seed, num_layers=2, cell=cell) for seed in range(3)]
    fused = combine_members(members)
    assert fused.config.ensemble == 3 and fused.state_size == 3 * 8 and len(fused.rnns) == 3
    lengths = torch.tensor([9, 4])
    x = torch.randn(2, 9, 5)
    with torch.no_grad():
        expected = torch.stack([m(x, lengths=lengths)[0] for m in members]).mean(0)
        got, _ = fused(x, lengths=lengths)
    assert (got - expected)[0].abs().max() <= 1e-5
    assert (got - expected)[1, :4].abs().max() <= 1e-5
    with torch.no_grad():  # the concatenated state carries every member across chunks
        first, state = fused(x[:, :4])
        rest, _ = fused(x[:, 4:], state)
        whole, _ = fused(x)
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-6)


def test_wrong_feature_count_is_refused_with_a_message():
    model = random_classifier(3)
    try:
        model(torch.randn(1, 3, 4))
    except AssertionError as error:
        assert "expected 5 features per frame, got 4" in str(error)
    else:
        raise AssertionError("a wrong feature count was accepted")


def test_normalisation_keeps_any_scale_and_only_centres_a_constant_feature():
    """Features measured in tiny units (1e-8) keep their spread (a floor of 1e-6 flattened them to noise),
    a constant one is centred, not divided by zero, and huge values (5e37) give finite statistics."""
    model = SequenceClassifier(ModelConfig(input_dim=3, num_classes=2, hidden_size=4))
    frames = torch.tensor([[1e-8, 5.0, 5e37], [3e-8, 5.0, 4e37], [2e-8, 5.0, 6e37]], dtype=torch.float32)
    frames64 = frames.double()
    model.set_normalisation(frames64.mean(0), frames64.std(0))
    z = (frames - model.feature_mean) / model.feature_std
    assert torch.isfinite(z).all() and torch.isfinite(model.feature_mean).all()
    np.testing.assert_allclose(z[:, 0], [-1.0, 1.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(z[:, 2], [0.0, -1.0, 1.0], atol=1e-3)
    assert model.feature_std[1] == 1.0 and z[:, 1].abs().max() == 0
