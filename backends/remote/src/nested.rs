//! Cell in cell (filled in below).
