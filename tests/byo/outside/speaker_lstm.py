"""A user's own model, written outside lstm-serve: a 1-layer nn.LSTM and a linear head, trained by the user's
own loop. lstm-serve only sees it through `lstm-serve export --module speaker_lstm:trained`."""

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("speaker_lstm.pt")


class SpeakerLSTM(nn.Module):
    def __init__(self, input_dim: int = 12, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, state=None):
        out, state = self.lstm(x, state)
        return self.head(out), state


def train(sequences, labels, epochs: int = 15) -> SpeakerLSTM:
    torch.manual_seed(0)
    model = SpeakerLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in zip(sequences, labels, strict=True):
            logits, _ = model(torch.as_tensor(x)[None])
            loss = nn.functional.cross_entropy(logits[:, -1], torch.tensor([y]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(model.state_dict(), WEIGHTS)
    return model


def trained() -> SpeakerLSTM:
    model = SpeakerLSTM()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model
