//! Evaluation: poses (ATE/RPE after Sim(3) Umeyama), depth (AbsRel, RMSE, δ<1.25), the Long3D
//! reconstruction protocol and flow (see [`streamrecon_flow::metrics`]); `eval run` over a
//! dataset (`run.rs`) and the demo's accuracy report (`report.rs`).

pub mod depth;
pub mod long3d;
pub mod plot;
pub mod pose;
pub mod report;
pub mod run;
