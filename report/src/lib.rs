//! Offline pages a person reads: the run report (`pipeline report`, refreshed by
//! `pipeline run`) and the feature browser (`activation-producer features`). Each is one
//! self-contained HTML file (no network, no external scripts or fonts) with its charts as
//! inline SVG drawn by plotters. Rendering only: callers write the files.

pub mod charts;
pub mod data;
pub mod features;
pub mod html;
pub mod run;
