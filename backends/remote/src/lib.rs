//! Out-of-process backends: the driver protocol client (remote) and cell-in-cell (nested).
