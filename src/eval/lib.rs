//! Evaluation: poses (ATE/RPE after Sim(3) Umeyama), depth (AbsRel, RMSE, δ<1.25) and flow
//! (see [`streamrecon_flow::metrics`]).

pub mod depth;
pub mod long3d;
pub mod plot;
pub mod pose;
