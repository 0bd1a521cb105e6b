"""Dense reconstructions of decomposition results, shared by the tests as float64 oracles."""

from tensorized._ops import khatri_rao, mode_dot


def cp_full(res):
    """The tensor of a CP result (``weights``, ``factors``)."""
    shape = [f.shape[0] for f in res.factors]
    return (khatri_rao(res.factors) * res.weights).sum(-1).reshape(shape)


def tucker_full(res):
    """The tensor of a Tucker result (``core``, ``factors``; a ``None`` factor is identity)."""
    t = res.core
    for k, f in enumerate(res.factors):
        if f is not None:
            t = mode_dot(t, f, k)
    return t


def tt_full(cores):
    """The tensor of a tensor train with cores ``(r, n_k, r')`` (or TT-matrix cores
    ``(r, o_k, i_k, r')``: then the modes come interleaved, ``o_1, i_1, o_2, ...``)."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return t.reshape([n for c in cores for n in c.shape[1:-1]])
