"""A streaming sequence classifier: per-feature normalisation -> LSTM -> linear head at every step.

Read top to bottom: the config, the seed equations written out (`ReferenceLSTM`, for tests and
teaching), then the served network (`SequenceClassifier`: fused-gate `nn.LSTM`s, fast).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (L, B, H)


@dataclass
class ModelConfig:
    input_dim: int = 12  # D: features per frame (12 LPC cepstrum coefficients for JapaneseVowels)
    num_classes: int = 9  # C: classes (9 speakers)
    hidden_size: int = 64  # H: width of h and c in every layer (of each ensemble member)
    num_layers: int = 2  # L: stacked LSTM layers
    dropout: float = 0.1  # dropout between stacked layers, training only
    cell: str = "lstm"  # recurrent cell; the served contract is the same for every cell
    ensemble: int = 1  # K independent LSTMs side by side; the state is their h/c concatenated (L, B, K*H)

    def to_dict(self) -> dict:
        return asdict(self)


class ReferenceLSTM(nn.Module):
    """The seed equations, one gate at a time. Same parameter names and layout as `nn.LSTM`
    (weights stacked as [i, f, c~, o]), so `load_state_dict` moves weights between the two.

        i_t  = sigmoid(x_t W_xi + h_{t-1} W_hi + b_i)
        f_t  = sigmoid(x_t W_xf + h_{t-1} W_hf + b_f)
        o_t  = sigmoid(x_t W_xo + h_{t-1} W_ho + b_o)
        c~_t = tanh(x_t W_xc + h_{t-1} W_hc + b_c)
        c_t  = f_t * c_{t-1} + i_t * c~_t
        h_t  = o_t * tanh(c_t)
    """

    def __init__(self, input_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        for layer in range(num_layers):
            d = input_dim if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, d)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))

    def cell(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> State:
        """One step of one layer: x (B, D), h and c (B, H)."""
        w_x = getattr(self, f"weight_ih_l{layer}").chunk(4)  # W_xi, W_xf, W_xc, W_xo (transposed)
        w_h = getattr(self, f"weight_hh_l{layer}").chunk(4)
        b = (getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")).chunk(4)
        i = torch.sigmoid(x @ w_x[0].T + h @ w_h[0].T + b[0])
        f = torch.sigmoid(x @ w_x[1].T + h @ w_h[1].T + b[1])
        c_tilde = torch.tanh(x @ w_x[2].T + h @ w_h[2].T + b[2])
        o = torch.sigmoid(x @ w_x[3].T + h @ w_h[3].T + b[3])
        c = f * c + i * c_tilde
        h = o * torch.tanh(c)
        return h, c

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x (B, T, D) -> outputs of the last layer (B, T, H) and the final (h, c), each (L, B, H)."""
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
            state = (zeros, zeros)
        hs, cs = list(state[0]), list(state[1])
        outputs = []
        for t in range(T):
            inp = x[:, t]
            for layer in range(self.num_layers):
                hs[layer], cs[layer] = self.cell(layer, inp, hs[layer], cs[layer])
                inp = hs[layer]
            outputs.append(inp)
        return torch.stack(outputs, dim=1), (torch.stack(hs), torch.stack(cs))


class SequenceClassifier(nn.Module):
    """Raw frames in, per-step class logits out. The class of a sequence is the logit at its last
    valid step, so the same network classifies whole sequences and streams frame by frame."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.cell == "lstm", f"unknown cell {config.cell!r}; this network implements 'lstm'"
        self.config = config
        # normalisation statistics of the training split, part of the exported graph
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        self.lstms = nn.ModuleList(
            nn.LSTM(
                config.input_dim,
                config.hidden_size,
                config.num_layers,
                batch_first=True,
                dropout=config.dropout if config.num_layers > 1 else 0.0,
            )
            for _ in range(config.ensemble)
        )
        # W_hy, applied at every step; with K members it holds each member's head divided by K,
        # so its output is the mean of the members' logits
        self.head = nn.Linear(config.ensemble * config.hidden_size, config.num_classes)

    @property
    def state_size(self) -> int:
        return self.config.ensemble * self.config.hidden_size

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        assert mean.shape == std.shape == (self.config.input_dim,), f"expected ({self.config.input_dim},) stats"
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def zero_state(self, batch_size: int) -> State:
        zeros = self.feature_mean.new_zeros(self.config.num_layers, batch_size, self.state_size)
        return zeros, zeros.clone()

    def forward(
        self, x: torch.Tensor, state: State | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """x (B, T, D) raw features; lengths (B,) valid steps per row, padding after them never
        touches the state. Returns logits (B, T, C) and the state after each row's last valid step."""
        B, T, D = x.shape
        assert self.config.input_dim == D, f"expected {self.config.input_dim} features per frame, got {D}"
        if state is None:
            state = self.zero_state(B)
        z = (x - self.feature_mean) / self.feature_std
        K = self.config.ensemble
        h0, c0 = state[0].chunk(K, dim=2), state[1].chunk(K, dim=2)  # K x (L, B, H)
        outs, hn, cn = [], [], []
        for lstm, h, c in zip(self.lstms, h0, c0, strict=True):
            out, (h, c) = self.run_lstm(lstm, z, (h.contiguous(), c.contiguous()), lengths)
            outs.append(out)
            hn.append(h)
            cn.append(c)
        out = torch.cat(outs, dim=2)  # (B, T, K*H)
        return self.head(out), (torch.cat(hn, dim=2), torch.cat(cn, dim=2))  # (B, T, C)

    @staticmethod
    def run_lstm(lstm: nn.LSTM, z: torch.Tensor, state: State, lengths: torch.Tensor | None):
        if lengths is None:
            return lstm(z, state)
        # the exported ONNX LSTM takes lengths in any order, so the graph needs no sort
        exporting = torch.onnx.is_in_onnx_export()
        packed = pack_padded_sequence(z, lengths.cpu(), batch_first=True, enforce_sorted=exporting)
        out, state = lstm(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=z.shape[1])
        return out, state

    @staticmethod
    def last_step(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, C) per-step logits -> (B, C) logits at each row's last valid step."""
        index = (lengths - 1).to(logits.device).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, index).squeeze(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def combine_members(members: list[SequenceClassifier]) -> SequenceClassifier:
    """K separately trained classifiers -> one that runs them side by side and averages their logits.
    Each member keeps its own nn.LSTM (K small LSTM ops in the exported graph, not one K-times wider
    one), so the ensemble costs K times one member and streams like any single model."""
    first = members[0]
    if len(members) == 1:
        return first
    for m in members:
        assert m.config == first.config and m.config.ensemble == 1, "members must share one single-LSTM config"
        assert torch.equal(m.feature_mean, first.feature_mean), "ensemble members must share normalisation"
    K = len(members)
    combined = SequenceClassifier(ModelConfig(**{**first.config.to_dict(), "ensemble": K}))
    with torch.no_grad():
        combined.feature_mean.copy_(first.feature_mean)
        combined.feature_std.copy_(first.feature_std)
        for slot, member in zip(combined.lstms, members, strict=True):
            slot.load_state_dict(member.lstms[0].state_dict())
        combined.head.weight.copy_(torch.cat([m.head.weight for m in members], dim=1) / K)
        combined.head.bias.copy_(torch.stack([m.head.bias for m in members]).mean(0))
    return combined.eval()
