"""The seed equations, the served network and the ensemble fusion, checked against torch."""

import torch
from torch import nn

from model.model import ModelConfig, ReferenceLSTM, SequenceClassifier, combine_members


def random_classifier(seed: int, **overrides) -> SequenceClassifier:
    torch.manual_seed(seed)
    model = SequenceClassifier(ModelConfig(**{"input_dim": 5, "num_classes": 4, "hidden_size": 8, **overrides}))
    model.set_normalisation(torch.linspace(-1, 1, 5), torch.linspace(0.5, 2, 5))
    return model.eval()


def test_reference_equations_equal_torch_lstm():
    torch.manual_seed(0)
    D, H, L, B, T = 6, 10, 3, 4, 13
    fused = nn.LSTM(D, H, L, batch_first=True)
    reference = ReferenceLSTM(D, H, L)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, T, D)
    state = (torch.randn(L, B, H), torch.randn(L, B, H))
    with torch.no_grad():
        expected_out, (expected_h, expected_c) = fused(x, state)
        out, (h, c) = reference(x, state)
    for ours, theirs in [(out, expected_out), (h, expected_h), (c, expected_c)]:
        assert (ours - theirs).abs().max().item() <= 1e-6


def test_padding_never_reaches_state_or_valid_logits():
    model = random_classifier(1)
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 5)
    x[1, 3:] = 1e3  # garbage in the padding must change nothing
    x[2, 5:] = -1e3
    with torch.no_grad():
        logits, (h, c) = model(x, lengths=lengths)
        for row, n in enumerate(lengths.tolist()):
            alone, (h1, c1) = model(x[row : row + 1, :n])
            assert torch.allclose(logits[row, :n], alone[0], atol=1e-6)
            assert torch.allclose(h[:, row], h1[:, 0], atol=1e-6) and torch.allclose(c[:, row], c1[:, 0], atol=1e-6)


def test_streaming_in_chunks_equals_one_call():
    model = random_classifier(2)
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


def test_an_ensemble_is_exactly_the_mean_of_its_members_and_streams():
    members = [random_classifier(seed, num_layers=2) for seed in range(3)]
    fused = combine_members(members)
    assert fused.config.ensemble == 3 and fused.state_size == 3 * 8 and len(fused.lstms) == 3
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
