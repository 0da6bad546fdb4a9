//! Integration tests: d1_client.
