// The fleet view's layout problems, one line each (tests/e2e/test_dashboard_browser.py, which says what is checked).
(expected) => {
  const problems = [];
  const vw = window.innerWidth;
  const px = (n) => `${Math.round(n)}px`;
  // Glyph boxes reach a px or two past the text drawn (a rotated axis title's ascent): allow that much.
  const outside = (r, box, slack = 1) => r.width > 0 && (r.left < box.left - slack || r.right > box.right + slack);
  const over = (r, box, slack = 1) => r.height > 0 && (r.top < box.top - slack || r.bottom > box.bottom + slack);
  const root = document.documentElement;
  if (root.scrollWidth > vw) problems.push(`the page is ${px(root.scrollWidth)} wide in a ${px(vw)} window`);
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main) return ['no stMain: the page did not render'];
  if (main.scrollWidth > main.clientWidth + 1)
    problems.push(`the main area scrolls sideways: ${px(main.scrollWidth)} of content in ${px(main.clientWidth)}`);
  const mainBox = main.getBoundingClientRect();
  const titleOf = (el) => {
    let item = el.closest('[data-testid="stElementContainer"]');
    while (item && !item.querySelector('h1, h2, h3')) item = item.previousElementSibling;
    return item ? item.querySelector('h1, h2, h3').textContent.trim() : '(untitled)';
  };
  for (const item of main.querySelectorAll('[data-testid="stElementContainer"]')) {
    const r = item.getBoundingClientRect();
    if (outside(r, mainBox)) problems.push(`an element under "${titleOf(item)}" reaches ${px(r.right)} of ${px(vw)}`);
  }

  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
  if (charts.length < expected.charts) problems.push(`${charts.length} charts drawn of ${expected.charts}`);
  const legendLabels = new Set();
  for (const chart of charts) {
    const name = titleOf(chart);
    const svg = chart.querySelector('svg');
    if (!svg) { problems.push(`"${name}": not drawn yet`); continue; }
    const box = svg.getBoundingClientRect();
    const frame = chart.getBoundingClientRect();
    if (box.right > frame.right + 1 || box.right > mainBox.right + 1)
      problems.push(`"${name}": the chart (${px(box.width)}) is wider than its place (${px(frame.width)})`);
    // The plot itself, as its grid lines span it: squeezed flat when the legend or axes took the chart's height.
    const grid = [...svg.querySelectorAll('.role-axis-grid')].map((g) => g.getBoundingClientRect());
    if (grid.length) {
      const top = Math.min(...grid.map((r) => r.top)), bottom = Math.max(...grid.map((r) => r.bottom));
      if (bottom - top < 20) problems.push(`"${name}": its plot is ${px(bottom - top)} high`);
    }
    for (const legend of svg.querySelectorAll('.role-legend')) {
      const r = legend.getBoundingClientRect();
      if (outside(r, box, 4) || over(r, box, 4))
        problems.push(`"${name}": its legend (${px(r.left)}-${px(r.right)}) is cut off by the chart (${px(box.left)}-${px(box.right)})`);
      for (const label of legend.querySelectorAll('.role-legend-label text, text')) legendLabels.add(label.textContent);
    }
    for (const text of svg.querySelectorAll('text')) {
      const label = text.textContent;
      // A legend label may be cut at the plot's width (the series' tooltip names it in full; the names in
      // expected.legend must be whole); an axis label may not. Vega ends a legend that ran out of entries
      // with "…N entries": those series have no entry at all.
      const inLegend = text.closest('.role-legend') !== null;
      if (inLegend && /^…\d+ entries$/.test(label)) problems.push(`"${name}": its legend leaves out ${label.slice(1)}`);
      else if (label.endsWith('…') && !inLegend) problems.push(`"${name}": the label "${label}" is truncated`);
      else if (outside(text.getBoundingClientRect(), box, 4) || over(text.getBoundingClientRect(), box, 4)) problems.push(`"${name}": the label "${label}" is cut off`);
    }
  }
  for (const label of expected.legend)
    if (!legendLabels.has(label)) problems.push(`no legend shows "${label}" in full`);

  // Tables: every column's header fully in view. An HTML table in Markdown has no frame of its own: its place
  // is its element's, which it must not run out of.
  const selector = '[data-testid="stTable"], [data-testid="stDataFrame"], [data-testid="stMarkdownContainer"] table';
  const tables = [...document.querySelectorAll(selector)];
  if (tables.length < expected.tables) problems.push(`${tables.length} tables of ${expected.tables}`);
  for (const table of tables) {
    const name = titleOf(table);
    const place = table.matches('table') ? table.closest('[data-testid="stElementContainer"]') : table;
    const box = place.getBoundingClientRect();
    const r = table.getBoundingClientRect();
    if (outside(r, box)) problems.push(`"${name}": the table (${px(r.width)}) is wider than its place (${px(box.width)})`);
    const grid = table.querySelector('.dvn-scroller');
    const headers = [...table.querySelectorAll('th, [role="columnheader"]')].filter((th) => th.closest('thead'));
    const names = headers.map((th) => th.textContent.trim());
    for (const column of expected.columns)
      if (!names.includes(column)) problems.push(`"${name}": no header "${column}" in view (headers: ${names.join(', ')})`);
    if (grid) {  // a canvas grid: its headers have no boxes; columns that do not fit pan in sideways
      if (grid.scrollWidth > grid.clientWidth + 1)
        problems.push(`"${name}": its columns are ${px(grid.scrollWidth)} wide in ${px(grid.clientWidth)}: some are out of view`);
      continue;
    }
    for (const scroller of [place, ...place.querySelectorAll('*')])
      if (scroller.scrollWidth > scroller.clientWidth + 1 && getComputedStyle(scroller).overflowX !== 'visible')
        problems.push(`"${name}": the table scrolls sideways (${px(scroller.scrollWidth)} in ${px(scroller.clientWidth)})`);
    for (const th of headers) {
      const r = th.getBoundingClientRect();
      const label = th.textContent.trim();
      if (th.scrollWidth > th.clientWidth + 1) problems.push(`"${name}": the header "${label}" is clipped`);
      if (outside(r, box) || outside(r, mainBox)) problems.push(`"${name}": the header "${label}" is out of view`);
    }
  }
  return problems;
}
