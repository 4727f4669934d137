"""The step broadcast: one packed int64 buffer per model pass, from rank 0 to every worker.

A pass is a fixed-size header (what to do, how to run it, and the lengths that size the payload) then
the payload: input_ids | positions | slot_mapping | block_tables | query_start_loc | seq_lens | logits
rows. Both are broadcasts over the engine's group (gloo needs every rank to know a buffer's size
beforehand).

How to run it: `graph_size` is EAGER for an eager pass, else the padded batch size of the captured
decode graph rank 0 replays (the query length is max_query_len). The all-reduces and gathers inside
a pass are collectives, so every worker must run the same kind of pass at the same padded shape:
rank 0 decides, the header tells.
"""
from __future__ import annotations

import torch

from ..layers.parallel import TensorParallel
from ..model.model_runner import StepInputs

OP_STOP, OP_FORWARD = 0, 1
EAGER = 0        # graph_size of a pass that runs eagerly
# op, model, num_tokens, num_seqs, max_blocks, num_rows, max_query_len, max_seq_len, graph_size
HEADER_LEN = 9
SOURCE_RANK = 0


class StepChannel:
    def __init__(self, device: torch.device, tp: TensorParallel):
        self.device = device        # NCCL broadcasts device tensors; gloo CPU ones
        self.tp = tp

    def _broadcast(self, buf: torch.Tensor) -> torch.Tensor:
        return self.tp.broadcast(buf, SOURCE_RANK)

    # ------------------------------------------------------------------ rank 0
    def send_forward(self, model: int, step: StepInputs, rows: torch.Tensor, graph_size: int = EAGER) -> None:
        num_seqs, max_blocks = step.block_tables.shape
        header = torch.tensor([OP_FORWARD, model, step.input_ids.shape[0], num_seqs, max_blocks, rows.shape[0],
                               step.max_query_len, step.max_seq_len, graph_size], dtype=torch.long)
        self._broadcast(header.to(self.device))
        parts = (step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.query_start_loc,
                 step.seq_lens, rows)
        self._broadcast(torch.cat([p.reshape(-1).to(self.device, torch.long) for p in parts]))

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([OP_STOP] + [0] * (HEADER_LEN - 1), dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------ workers
    def receive(self) -> tuple[int, int, StepInputs | None, torch.Tensor | None, int]:
        """-> (op, model, step, logits rows, graph_size); step and rows are None for OP_STOP."""
        header = self._broadcast(torch.empty(HEADER_LEN, dtype=torch.long, device=self.device)).tolist()
        op, model, n, num_seqs, max_blocks, num_rows, max_query_len, max_seq_len, graph_size = header
        if op == OP_STOP:
            return op, model, None, None, EAGER
        sizes = [n, n, n, num_seqs * max_blocks, num_seqs + 1, num_seqs, num_rows]
        flat = self._broadcast(torch.empty(sum(sizes), dtype=torch.long, device=self.device))
        ids, pos, slots, tables, qsl, lens, rows = flat.split(sizes)
        i32 = torch.int32
        step = StepInputs(ids, pos, slots, tables.to(i32).reshape(num_seqs, max_blocks), qsl.to(i32), lens.to(i32),
                          max_query_len, max_seq_len)
        return op, model, step, rows, graph_size
