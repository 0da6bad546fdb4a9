//! Embedded implementation of the token store on redb, a crash-safe single-file database.
