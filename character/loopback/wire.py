"""The protobuf bodies of the Tinker API: forward/backward requests in, forward/backward outputs and
sample responses out (the SDK asks for these two results as `application/x-protobuf`).

The SDK's own `tinker.proto` module defines the messages; this is the server's half of
`tinker/proto/request_conv.py` and `response_conv.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_STOP = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


@dataclass
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    data: list[types.Datum]


def _tensor(msg: pb.Tensor) -> types.TensorData:
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None or msg.HasField("sparse_csr"):
        raise ValueError("the loopback service reads dense float32/int64 tensors only")
    arr = np.frombuffer(msg.dense, dtype=dtype).copy()
    shape = list(msg.shape) or [arr.size]
    return types.TensorData(data=arr.reshape(shape), dtype="int64" if dtype != np.float32 else "float32", shape=shape)


def _model_input(chunks) -> types.ModelInput:
    tokens: list[int] = []
    for c in chunks:
        if not c.HasField("encoded_text"):
            raise ValueError("the loopback service reads text tokens only (no images or audio)")
        tokens.extend(np.frombuffer(c.encoded_text.tokens, dtype=np.int32).tolist())
    return types.ModelInput.from_ints(tokens)


def read_forward_backward(body: bytes) -> ForwardBackward:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(body)
    data = [
        types.Datum(
            model_input=_model_input(d.model_input),
            loss_fn_inputs={name: _tensor(t) for name, t in d.loss_fn_inputs.items()},
        )
        for d in msg.data
    ]
    return ForwardBackward(msg.model_id, msg.seq_id, msg.loss_fn, msg.forward_only, data)


def _batched(arrays: list[np.ndarray], dtype: int) -> pb.BatchedTensor:
    np_dtype = _NUMPY[dtype]
    flat = [np.ascontiguousarray(a, dtype=np_dtype).ravel() for a in arrays]
    offsets = np.cumsum([0] + [a.nbytes for a in flat]).astype(np.int64)
    data = b"".join(a.tobytes() for a in flat)
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=dtype)


def forward_backward_output(logprobs: list[np.ndarray], losses: list[np.ndarray], metrics: dict) -> bytes:
    """One ArrayRecord with every datum's per-token `logprobs` and `elementwise_loss`."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(logprobs))
    record.fields["logprobs"].CopyFrom(_batched(logprobs, pb.DTYPE_FLOAT32))
    record.fields["elementwise_loss"].CopyFrom(_batched(losses, pb.DTYPE_FLOAT32))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.loss_fn_outputs.append(record)
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    return out.SerializeToString()


def sample_response(sequences: list[types.SampledSequence], prompt_logprobs: list[float | None] | None) -> bytes:
    out = pb.SampleResponse()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = _STOP[s.stop_reason]
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        if s.logprobs is not None:
            seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in prompt_logprobs]
        out.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return out.SerializeToString()
