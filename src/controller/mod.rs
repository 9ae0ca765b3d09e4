//! `wsfleet controller`: sizes, drains and rebalances the fleet on
//! Kubernetes.
//!
//! * [`decide`] - every decision as a pure function (replicas, victims,
//!   shedding orders, leadership), table-tested
pub mod decide;
