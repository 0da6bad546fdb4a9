//! rustls configuration shared by the gateway listener, the D1 client and the simulator.
