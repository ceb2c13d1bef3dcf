import torch
import torch.nn.functional as F
from torch import nn

from slimserve.layers.linear import Linear


class LMHead(Linear):
    """(R, hidden) -> (R, V) logits; the runner passes only the rows that need them."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(hidden_size, [vocab_size])


class VocabEmbedding(nn.Module):
    """Token embeddings; when tied to the LM head it reads the head's (hidden, V) weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_head: LMHead | None = None):
        super().__init__()
        self.tied_head = tied_head
        if tied_head is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if self.tied_head is not None:
            self.tied_head.load(name, tensor)
        else:
            self.weight.copy_(tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tied_head is None:
            return F.embedding(input_ids, self.weight)
        return self.tied_head.weight.index_select(1, input_ids).t()  # (T, hidden)
