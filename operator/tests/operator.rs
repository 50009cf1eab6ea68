//! The operator's one integration-test binary (one binary saves link time); each module is one
//! area. See operator/README.md for what these tests do and do not cover.

// Shared with the root package's tests/kube, which uses parts these tests do not.
#[allow(dead_code)]
#[path = "operator/fake_api.rs"]
mod fake_api;

#[path = "operator/controller.rs"]
mod controller;

#[path = "operator/leader.rs"]
mod leader;

#[path = "operator/manifests.rs"]
mod manifests;
