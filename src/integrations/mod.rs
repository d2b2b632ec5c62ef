//! Integrations with the systems that start and stop jobs (batch schedulers and the like).
//! Each one only reads its environment and talks to its tools; the supervisor decides.

pub mod cloud;
pub mod slurm;
