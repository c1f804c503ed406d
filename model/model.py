"""A streaming sequence classifier: per-feature normalisation -> recurrent cell -> linear head at every step.

Read top to bottom: the config; the seed equations written out, one gate at a time, for the three
LSTM variants (`GatedLSTM`: standard, peephole, coupled) and the GRU (`ReferenceGRU`); then the
served network (`SequenceClassifier`), which runs PyTorch's fused `nn.LSTM` / `nn.GRU` where one
exists and `GatedLSTM` for the peephole and coupled cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

State = tuple[torch.Tensor, ...]  # (h, c) for the LSTM cells, (h,) for the GRU; each (L, B, H)
CELLS = ("lstm", "peephole", "coupled", "gru")


@dataclass
class ModelConfig:
    input_dim: int = 12  # D: features per frame (12 LPC cepstrum coefficients for JapaneseVowels)
    num_classes: int = 9  # C: classes (9 speakers)
    hidden_size: int = 64  # H: width of h (and c) in every layer (of each ensemble member)
    num_layers: int = 2  # L: stacked recurrent layers
    dropout: float = 0.1  # dropout between stacked layers, training only
    cell: str = "lstm"  # one of CELLS; the served contract is the same for every cell
    ensemble: int = 1  # K independent networks side by side; the state is theirs concatenated (L, B, K*H)

    def to_dict(self) -> dict:
        return asdict(self)


def state_names(cell: str) -> tuple[str, ...]:
    return ("h",) if cell == "gru" else ("h", "c")


class GatedLSTM(nn.Module):
    """The seed equations of the LSTM and its two variants, one gate at a time.

        standard   i_t  = sigmoid(x_t W_xi + h_{t-1} W_hi + b_i)
                   f_t  = sigmoid(x_t W_xf + h_{t-1} W_hf + b_f)
                   c~_t = tanh(x_t W_xc + h_{t-1} W_hc + b_c)
                   c_t  = f_t * c_{t-1} + i_t * c~_t
                   o_t  = sigmoid(x_t W_xo + h_{t-1} W_ho + b_o)
                   h_t  = o_t * tanh(c_t)
        peephole   the gates also see the cell: f_t and i_t add p_f * c_{t-1} and p_i * c_{t-1},
                   o_t adds p_o * c_t (p are per-unit weights: diagonal peephole connections)
        coupled    no input gate: i_t = 1 - f_t, so what is forgotten is what gets written

    Parameter names and layout as `nn.LSTM` (weights stacked [i, f, c~, o]), so `load_state_dict`
    moves weights between a standard GatedLSTM and nn.LSTM; the coupled cell stacks [f, c~, o]; the
    peephole cell adds `weight_peephole_l{k}`, rows [p_i, p_f, p_o]. Slow (a Python loop over time)
    but exact; the export maps each variant onto ONNX's LSTM op, which has both variants built in.
    """

    def __init__(
        self, input_dim: int, hidden_size: int, num_layers: int, variant: str = "lstm", dropout: float = 0.0
    ) -> None:
        super().__init__()
        assert variant in ("lstm", "peephole", "coupled"), f"unknown LSTM variant {variant!r}"
        self.hidden_size, self.num_layers, self.variant, self.dropout = hidden_size, num_layers, variant, dropout
        gates = 3 if variant == "coupled" else 4
        bound = hidden_size**-0.5  # nn.LSTM's initialisation
        for layer in range(num_layers):
            d = input_dim if layer == 0 else hidden_size
            shapes = {
                "weight_ih": (gates * hidden_size, d),
                "weight_hh": (gates * hidden_size, hidden_size),
                "bias_ih": (gates * hidden_size,),
                "bias_hh": (gates * hidden_size,),
            }
            if variant == "peephole":
                shapes["weight_peephole"] = (3, hidden_size)
            for name, shape in shapes.items():
                self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def layer(
        self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer over the whole sequence: x (B, T, D), h and c (B, H) -> outputs (B, T, H), h, c.
        Past a row's length its state stays as it was and its output is zero (as with packed sequences)."""
        w_hh = getattr(self, f"weight_hh_l{layer}")
        bias = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
        x_part = x @ getattr(self, f"weight_ih_l{layer}").T + bias  # every step's input term at once
        peep = getattr(self, f"weight_peephole_l{layer}", None)
        outputs = []
        for t in range(x.shape[1]):
            gates = (x_part[:, t] + h @ w_hh.T).chunk(3 if self.variant == "coupled" else 4, dim=1)
            if self.variant == "coupled":
                f_in, g_in, o_in = gates
                f = torch.sigmoid(f_in)
                i = 1 - f
            else:
                i_in, f_in, g_in, o_in = gates
                if peep is not None:
                    i_in, f_in = i_in + peep[0] * c, f_in + peep[1] * c
                i, f = torch.sigmoid(i_in), torch.sigmoid(f_in)
            c_new = f * c + i * torch.tanh(g_in)
            if peep is not None:
                o_in = o_in + peep[2] * c_new
            h_new = torch.sigmoid(o_in) * torch.tanh(c_new)
            if lengths is not None:
                valid = (t < lengths).to(x.device).unsqueeze(1)
                h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
                outputs.append(h_new * valid)
            else:
                h, c = h_new, c_new
                outputs.append(h)
        return torch.stack(outputs, dim=1), h, c

    def forward(
        self, x: torch.Tensor, state: State | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """x (B, T, D) -> outputs of the last layer (B, T, H) and the final (h, c), each (L, B, H)."""
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            state = (zeros, zeros)
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer:
                x = nn.functional.dropout(x, self.dropout, self.training)
            x, h, c = self.layer(layer, x, state[0][layer], state[1][layer], lengths)
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))


class ReferenceGRU(nn.Module):
    """The GRU of the notes, one gate at a time, with `nn.GRU`'s names and layout ([r, z, n]):

        r_t  = sigmoid(x_t W_xr + h_{t-1} W_hr + b_r)              reset gate
        z_t  = sigmoid(x_t W_xz + h_{t-1} W_hz + b_z)              update gate
        h~_t = tanh(x_t W_xh + r_t * (h_{t-1} W_hh + b_hh) + b_xh)  candidate state
        h_t  = (1 - z_t) * h~_t + z_t * h_{t-1}

    Two conventions differ from the notes' figure: z_t here is the share of the old state kept (the
    notes' z_t is 1 - this one), and the reset gate multiplies h_{t-1} W_hh after the product, not
    h_{t-1} before it; both are what `nn.GRU` and ONNX's GRU op (linear_before_reset=1) compute.
    """

    def __init__(self, input_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        for layer in range(num_layers):
            d = input_dim if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, d)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))

    def cell(self, layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x_r, x_z, x_h = (x @ getattr(self, f"weight_ih_l{layer}").T + getattr(self, f"bias_ih_l{layer}")).chunk(3, 1)
        h_r, h_z, h_h = (h @ getattr(self, f"weight_hh_l{layer}").T + getattr(self, f"bias_hh_l{layer}")).chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_h + r * h_h)
        return (1 - z) * candidate + z * h

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x (B, T, D) -> outputs of the last layer (B, T, H) and the final (h,), (L, B, H)."""
        hs = list(state[0]) if state else [x.new_zeros(x.shape[0], self.hidden_size)] * self.num_layers
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for layer in range(self.num_layers):
                hs[layer] = inp = self.cell(layer, inp, hs[layer])
            outputs.append(inp)
        return torch.stack(outputs, dim=1), (torch.stack(hs),)


def make_rnn(config: ModelConfig) -> nn.Module:
    """The fastest exact module for a cell: PyTorch's fused kernels where they exist."""
    dropout = config.dropout if config.num_layers > 1 else 0.0
    args = (config.input_dim, config.hidden_size, config.num_layers)
    if config.cell == "lstm":
        return nn.LSTM(*args, batch_first=True, dropout=dropout)
    if config.cell == "gru":
        return nn.GRU(*args, batch_first=True, dropout=dropout)
    return GatedLSTM(*args, variant=config.cell, dropout=dropout)


class SequenceClassifier(nn.Module):
    """Raw frames in, per-step class logits out. The class of a sequence is the logit at its last
    valid step, so the same network classifies whole sequences and streams frame by frame."""

    # buffers, registered in __init__; declared here so they type as tensors, not as Module.__getattr__'s union
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.cell in CELLS, f"unknown cell {config.cell!r}; choose one of {CELLS}"
        self.config = config
        # normalisation statistics of the training split, part of the exported graph
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        self.rnns = nn.ModuleList(make_rnn(config) for _ in range(config.ensemble))
        # W_hy, applied at every step; with K members it holds each member's head divided by K,
        # so its output is the mean of the members' logits
        self.head = nn.Linear(config.ensemble * config.hidden_size, config.num_classes)

    @property
    def state_size(self) -> int:
        return self.config.ensemble * self.config.hidden_size

    @property
    def state_names(self) -> tuple[str, ...]:
        return state_names(self.config.cell)

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        assert mean.shape == std.shape == (self.config.input_dim,), f"expected ({self.config.input_dim},) stats"
        self.feature_mean.copy_(mean)
        # a constant feature (std 0) is only centred; any other keeps its own scale, however small
        self.feature_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def zero_state(self, batch_size: int) -> State:
        shape = (self.config.num_layers, batch_size, self.state_size)
        return tuple(self.feature_mean.new_zeros(shape) for _ in self.state_names)

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
        member_states = zip(*(s.chunk(K, dim=2) for s in state), strict=True)  # K x (h, c) of (L, B, H)
        outs, finals = [], []
        for rnn, member_state in zip(self.rnns, member_states, strict=True):
            out, final = self.run_rnn(rnn, z, tuple(s.contiguous() for s in member_state), lengths)
            outs.append(out)
            finals.append(final)
        out = torch.cat(outs, dim=2)  # (B, T, K*H)
        return self.head(out), tuple(torch.cat(parts, dim=2) for parts in zip(*finals, strict=True))

    @staticmethod
    def run_rnn(
        rnn: nn.Module, z: torch.Tensor, state: State, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        if isinstance(rnn, GatedLSTM):
            return rnn(z, state, lengths)
        torch_state = state[0] if isinstance(rnn, nn.GRU) else state
        if lengths is None:
            out, final = rnn(z, torch_state)
        else:
            # the exported ONNX LSTM/GRU ops take lengths in any order, so the graph needs no sort
            exporting = torch.onnx.is_in_onnx_export()
            packed = pack_padded_sequence(z, lengths.cpu(), batch_first=True, enforce_sorted=exporting)
            out, final = rnn(packed, torch_state)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=z.shape[1])
        return out, (final,) if isinstance(rnn, nn.GRU) else final

    @staticmethod
    def last_step(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, C) per-step logits -> (B, C) logits at each row's last valid step."""
        index = (lengths - 1).to(logits.device).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, index).squeeze(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def combine_members(members: list[SequenceClassifier]) -> SequenceClassifier:
    """K separately trained classifiers -> one that runs them side by side and averages their logits.
    Each member keeps its own recurrent module (K small LSTM ops in the exported graph, not one K-times
    wider one), so the ensemble costs K times one member and streams like any single model."""
    first = members[0]
    if len(members) == 1:
        return first
    for m in members:
        assert m.config == first.config and m.config.ensemble == 1, "members must share one single-network config"
        assert torch.equal(m.feature_mean, first.feature_mean), "ensemble members must share normalisation"
    K = len(members)
    combined = SequenceClassifier(ModelConfig(**{**first.config.to_dict(), "ensemble": K}))
    with torch.no_grad():
        combined.feature_mean.copy_(first.feature_mean)
        combined.feature_std.copy_(first.feature_std)
        for slot, member in zip(combined.rnns, members, strict=True):
            slot.load_state_dict(member.rnns[0].state_dict())
        combined.head.weight.copy_(torch.cat([m.head.weight for m in members], dim=1) / K)
        combined.head.bias.copy_(torch.stack([m.head.bias for m in members]).mean(0))
    return combined.eval()
