//! Client for Thales D1 eCom Enablement: OAuth2 (ES256 assertions), mTLS, JWE, resilience.
