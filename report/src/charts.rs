//! Charts as inline SVG, drawn by plotters' SVG backend (the browser draws the text, so
//! no font files are needed). Each chart is wrapped in a `<figure class="chart">` that
//! says what it holds (`data-kind`, `data-n`: the data points drawn), so a test can
//! check in a browser that every chart rendered its data.

use crate::html::esc;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Series colours (colour-blind safe, Okabe–Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
];
const FONT: &str = "sans-serif";

pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A drawn chart.
pub struct Chart {
    pub title: String,
    /// `line`, `scatter` or `bars`.
    pub kind: &'static str,
    /// Data points drawn (line vertices, scatter points, non-empty bars).
    pub n: usize,
    pub svg: String,
}

impl Chart {
    pub fn html(&self) -> String {
        format!(
            "<figure class=\"chart\" data-kind=\"{}\" data-n=\"{}\">{}<figcaption>{}</figcaption></figure>",
            self.kind,
            self.n,
            self.svg,
            esc(&self.title)
        )
    }
}

/// A number for an axis: 3 significant digits, k/M for large ones.
pub fn short(v: f64) -> String {
    let a = v.abs();
    // an axis tick at 0 computed as 1e-17
    if a < 1e-12 {
        return "0".into();
    }
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6).replace(".000M", "M")
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{:.*}", (2 - a.log10().floor() as i32).max(0) as usize, v);
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// `[lo, hi]` of finite values, padded by 5 %; a single value gets a unit range.
fn range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if lo > hi {
        return None;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.5
    } else {
        1.0
    };
    Some((lo - pad, hi + pad))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw<F>(w: u32, h: u32, f: F) -> Result<String, String>
where
    F: for<'a> FnOnce(&Area<'a>) -> Result<(), Box<dyn std::error::Error>>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        f(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Named `(x, y)` series.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Lines over a shared x axis, one per named series (a legend when there are several).
/// `None` when no series has a finite point.
pub fn lines(
    title: &str,
    x_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    (w, h): (u32, u32),
) -> Option<Chart> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || series.iter().flat_map(|(_, v)| v.iter().filter(finite));
    let n = pts().count();
    let (x0, x1) = range(pts().map(|p| p.0))?;
    let (y0, y1) = range(pts().map(|p| p.1))?;
    let svg = draw(w, h, |root| {
        let mut c = ChartBuilder::on(root)
            .margin(6)
            .x_label_area_size(30)
            .y_label_area_size(46)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        c.configure_mesh()
            .x_labels(5)
            .y_labels(5)
            .x_desc(x_desc)
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 13))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()?;
        for (i, (name, v)) in series.iter().enumerate() {
            let col = colour(i);
            let s = c.draw_series(LineSeries::new(
                v.iter().filter(finite).copied(),
                col.stroke_width(2),
            ))?;
            if series.len() > 1 {
                s.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], col.stroke_width(2))
                });
            }
        }
        if series.len() > 1 {
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(RGBColor(200, 200, 200))
                .label_font((FONT, 13))
                .draw()?;
        }
        Ok(())
    })
    .ok()?;
    Some(Chart {
        title: title.into(),
        kind: "line",
        n,
        svg,
    })
}

/// One labelled point per item; the `best` ones filled and joined by the frontier line.
pub struct ScatterPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub best: bool,
}

pub fn scatter(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[ScatterPoint],
    (w, h): (u32, u32),
) -> Option<Chart> {
    let pts: Vec<&ScatterPoint> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let (x0, x1) = range(pts.iter().map(|p| p.x))?;
    let (y0, y1) = range(pts.iter().map(|p| p.y))?;
    // room on the right for the labels of the rightmost points
    let x1 = x1 + (x1 - x0) * 0.25;
    let svg = draw(w, h, |root| {
        let mut c = ChartBuilder::on(root)
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        c.configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()?;
        let mut front: Vec<(f64, f64)> =
            pts.iter().filter(|p| p.best).map(|p| (p.x, p.y)).collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.draw_series(LineSeries::new(front, colour(1).mix(0.6).stroke_width(1)))?;
        c.draw_series(pts.iter().map(|p| {
            let style = if p.best {
                colour(1).filled()
            } else {
                colour(0).stroke_width(2)
            };
            EmptyElement::at((p.x, p.y))
                + Circle::new((0, 0), 5, style)
                + Text::new(p.label.clone(), (8, -4), (FONT, 13).into_font())
        }))?;
        Ok(())
    })
    .ok()?;
    Some(Chart {
        title: title.into(),
        kind: "scatter",
        n: pts.len(),
        svg,
    })
}

/// Bars `(left, right, count)`. `None` when every count is 0.
pub fn bars(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    bins: &[(f64, f64, u64)],
    (w, h): (u32, u32),
) -> Option<Chart> {
    let n = bins.iter().filter(|b| b.2 > 0).count();
    if n == 0 {
        return None;
    }
    let x0 = bins.first()?.0;
    let x1 = bins.last()?.1;
    let ymax = bins.iter().map(|b| b.2).max()? as f64 * 1.08;
    let small = h < 120;
    let svg = draw(w, h, |root| {
        let mut c = ChartBuilder::on(root)
            .margin(if small { 2 } else { 6 })
            .x_label_area_size(if small { 16 } else { 30 })
            .y_label_area_size(if small { 30 } else { 46 })
            .build_cartesian_2d(x0..x1, 0f64..ymax)?;
        let mut mesh = c.configure_mesh();
        mesh.x_labels(if small { 3 } else { 6 })
            .y_labels(if small { 2 } else { 5 })
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style((FONT, if small { 11 } else { 13 }))
            .disable_x_mesh()
            .light_line_style(RGBColor(238, 238, 238));
        if small {
            // hundreds of these on a feature page: no grid
            mesh.disable_y_mesh();
        } else {
            mesh.x_desc(x_desc)
                .y_desc(y_desc)
                .axis_desc_style((FONT, 13));
        }
        mesh.draw()?;
        c.draw_series(
            bins.iter()
                .filter(|b| b.2 > 0)
                .map(|b| Rectangle::new([(b.0, 0.0), (b.1, b.2 as f64)], colour(0).filled())),
        )?;
        Ok(())
    })
    .ok()?;
    Some(Chart {
        title: title.into(),
        kind: "bars",
        n,
        svg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_hold_their_data() {
        let s = vec![
            (
                "a".to_string(),
                vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
            ),
            ("b".to_string(), vec![(0.0, 2.0), (2.0, 1.5)]),
        ];
        let c = lines("loss", "tokens", &s, (300, 200)).unwrap();
        assert_eq!(c.n, 4);
        // data lines are 2 px wide (axes 1 px): two series + two legend marks
        assert_eq!(c.svg.matches("stroke-width=\"2\" points=").count(), 2 + 2);
        assert!(c
            .html()
            .starts_with("<figure class=\"chart\" data-kind=\"line\" data-n=\"4\"><svg"));
        assert!(lines("x", "t", &[("a".into(), vec![(f64::NAN, 1.0)])], (300, 200)).is_none());

        let p = [
            ScatterPoint {
                label: "k16".into(),
                x: 16.0,
                y: 0.9,
                best: true,
            },
            ScatterPoint {
                label: "k32 <b>".into(),
                x: 32.0,
                y: 0.95,
                best: false,
            },
        ];
        let c = scatter("frontier", "L0", "EV", &p, (400, 300)).unwrap();
        assert_eq!(c.n, 2);
        assert_eq!(c.svg.matches("<circle").count(), 2);
        // labels are escaped by the SVG backend
        assert!(c.svg.contains("k32 &lt;b&gt;"));

        let b = bars(
            "density",
            "log10",
            "latents",
            &[(0.0, 1.0, 3), (1.0, 2.0, 0), (2.0, 3.0, 5)],
            (300, 200),
        )
        .unwrap();
        assert_eq!(b.n, 2);
        assert!(bars("d", "x", "y", &[(0.0, 1.0, 0)], (300, 200)).is_none());
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(245760.0), "246k");
        assert_eq!(short(2_500_000.0), "2.500M");
        assert_eq!(short(0.001234), "0.00123");
        assert_eq!(short(12.5), "12.5");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(3e-5), "3.0e-5");
        assert_eq!(short(1000.0), "1000");
        assert_eq!(short(-6e-17), "0");
        // a constant series gets a range around it, not around 0
        let (lo, hi) = range([0.003, 0.003].into_iter()).unwrap();
        assert!(
            (lo - 0.0015).abs() < 1e-15 && (hi - 0.0045).abs() < 1e-15,
            "{lo} {hi}"
        );
    }
}
