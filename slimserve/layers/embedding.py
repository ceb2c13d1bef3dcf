import torch
import torch.nn.functional as F
from torch import nn

from slimserve.engine.forward_context import get_forward_context
from slimserve.layers.linear import Linear


class LMHead(Linear):
    """Logits only for the rows the sampler needs (one per sequence that caught up this step)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(hidden_size, [vocab_size])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden[get_forward_context().logits_indices])  # (S, V)


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
