//! Development key material (test CA, certificates, ES256 and JWE key pairs) for sandbox mode and tests.
