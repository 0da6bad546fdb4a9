//! D1 simulator: the D1 API as documented in docs/d1-protocol.md, with a control API for faults and lifecycle events.
