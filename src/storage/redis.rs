//! Redis implementation of the token store (standalone or Cluster).
