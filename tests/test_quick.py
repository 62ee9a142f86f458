"""`make quick-test`: in well under a minute, the model learns a small batch and then samples what it learned."""

import torch

from config import ModelConfig
from generate import Sampling, generate
from model import GPT


def test_model_learns_a_sequence_and_greedy_sampling_reproduces_it():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=32, block_size=24)
    model = GPT(config)
    sequence = torch.randint(0, 32, (1, 25))  # one random sequence: learnable only by memorising it
    x, y = sequence[:, :-1], sequence[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0 and loss.item() < 0.05  # from ~ln(32) = 3.47 to nearly zero

    model.eval()
    out = generate(model, sequence[:, :4], max_new_tokens=20, sampling=Sampling(temperature=0.0))
    assert torch.equal(out.tokens, sequence[:, 4:24])
