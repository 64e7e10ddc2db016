//! The page shell every page shares: one self-contained file (inline CSS and script, a
//! content security policy that forbids any request), and escaping.

/// Text escaped for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

const CSS: &str = r#"
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1320px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:22px;margin:12px 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin:0 0 12px}
.missing{color:#8a5a00;background:#fff6e0;border:1px solid #f0d9a0;padding:6px 10px;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.chart{width:min-content;margin:0;background:#fff;border:1px solid #e4e4e4;border-radius:4px;padding:4px}
figure.chart figcaption{font-size:12px;color:#444;text-align:center}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.best td{background:#eef7ee}
th.sort{cursor:pointer} th.sort:after{content:" \2195";color:#999}
pre{background:#fff;border:1px solid #e4e4e4;padding:8px;overflow:auto;max-height:360px;font-size:12px}
details{margin:6px 0} summary{cursor:pointer}
.ctx{font:12px/1.9 ui-monospace,monospace;white-space:pre-wrap;margin:2px 0;padding:2px 6px;background:#fff;border-left:3px solid #eee}
.ctx span{border-radius:2px}
.ctx span[style]{background:rgba(255,120,0,var(--a))}
.ctx span.max{outline:1px solid #c40}
.ctx .act{color:#888;margin-right:8px}
.tok{font:12px ui-monospace,monospace;background:#f3f3f3;padding:0 3px;border-radius:2px;white-space:pre}
.latent{background:#fff;border:1px solid #e4e4e4;border-radius:4px;padding:8px 12px;margin:12px 0}
.cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
a{color:#0366d6}
"#;

/// Sorts a table by the column clicked (numbers by `data-v` when present).
const SORT_JS: &str = r#"
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th.sort').forEach(function(th,col){
    th.addEventListener('click',function(){
      var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows);
      var dir=th.dataset.dir==='desc'?1:-1; th.dataset.dir=dir===1?'asc':'desc';
      var i=th.cellIndex;
      rows.sort(function(a,b){
        var x=parseFloat(a.cells[i].dataset.v), y=parseFloat(b.cells[i].dataset.v);
        return dir*((isNaN(x)?-Infinity:x)-(isNaN(y)?-Infinity:y));
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"#;

/// A whole page. Nothing in it may fetch anything: the policy allows inline styles and
/// scripts and `data:` images, nothing else.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{CSS}</style></head><body><main>\n{body}\n</main><script>{SORT_JS}</script></body></html>\n",
        esc(title)
    )
}

/// A note that something is not there (yet), said instead of an error.
pub fn missing(what: &str) -> String {
    format!("<p class=\"missing\">{}</p>", esc(what))
}

/// A table cell of a number: the value shown with `prec` decimals (or `-`), sortable.
pub fn num_cell(v: Option<f64>, prec: usize) -> String {
    match v.filter(|x| x.is_finite()) {
        Some(x) => format!("<td data-v=\"{x}\">{x:.prec$}</td>"),
        None => "<td data-v=\"NaN\">-</td>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_self_contained_shell() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let p = page("a <run>", "<p>x</p>");
        assert!(p.contains("<title>a &lt;run&gt;</title>"));
        assert!(p.contains("default-src 'none'"));
        // no external resource of any kind
        for bad in ["src=\"http", "href=\"http", "url(", "@import", "<link"] {
            assert!(!p.contains(bad), "{bad}");
        }
        assert_eq!(
            num_cell(Some(0.12345), 3),
            "<td data-v=\"0.12345\">0.123</td>"
        );
        assert_eq!(num_cell(Some(f64::NAN), 3), "<td data-v=\"NaN\">-</td>");
    }
}
