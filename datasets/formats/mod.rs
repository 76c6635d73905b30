//! File formats for flows, poses, point clouds and depth.

pub mod depth;
pub mod flo;
pub mod kitti_flow;
pub mod pcd;
pub mod ply;
pub mod rgb;
pub mod tum;
