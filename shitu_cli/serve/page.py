"""The web page `shitu serve` shows at /: pick or drop a photo, see its boxes, labels and scores, and add the
photo or one box's crop to the gallery under a label. One self-contained HTML document, no outside assets.
"""

BOX_COLOUR = "#ff00ff"  # magenta: rare in photos, so a screenshot test can count its pixels

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shitu</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 980px; }
  h1 { font-size: 1.3rem; margin: 0 0 .8rem; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; cursor: pointer; }
  #drop.over { border-color: #333; background: #f3f3f3; }
  #view { margin-top: 1rem; max-width: 100%; display: none; }
  table { border-collapse: collapse; margin-top: .8rem; }
  td, th { border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
  #status { margin-top: .6rem; min-height: 1.2em; }
  .error { color: #b00020; }
  fieldset { margin-top: 1rem; border: 1px solid #ccc; border-radius: 6px; }
  input[type=text], input[type=password] { padding: .25rem; }
</style>
</head>
<body>
<h1>shitu: what is in this photo?</h1>
<div id="drop">Drop a photo here, or <label><u>pick one</u><input id="file" type="file" accept="image/*" hidden></label></div>
<div id="status"></div>
<canvas id="view"></canvas>
<table id="results" hidden><thead><tr><th>#</th><th>label</th><th>score</th><th>next labels</th><th></th></tr></thead>
<tbody></tbody></table>
<fieldset>
  <legend>Add to the gallery</legend>
  <label>label <input id="label" type="text" placeholder="e.g. cola"></label>
  <button id="add-photo" disabled>add the photo</button>
  <label>token <input id="token" type="password" placeholder="if the server asks"></label>
  <div id="gallery"></div>
</fieldset>
<script>
const BOX = "__BOX_COLOUR__";
let photo = null, image = null;
const $ = (id) => document.getElementById(id);

function say(text, bad) { const s = $("status"); s.textContent = text; s.className = bad ? "error" : ""; }
function headers() { const t = $("token").value; if (t) localStorage.setItem("shitu-token", t); return t ? {"Authorization": "Bearer " + t} : {}; }

async function call(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({error: "no JSON in the answer (HTTP " + response.status + ")"}));
  if (!response.ok) throw new Error(body.error + (body.hint ? " (" + body.hint + ")" : ""));
  return body;
}

async function gallery() {
  try {
    const g = await call("/gallery", {headers: headers()});
    $("gallery").textContent = g.count + " items, " + Object.keys(g.labels).length + " labels (generation " + g.generation + "): " +
      Object.entries(g.labels).map(([k, v]) => k + " " + v).join(", ");
  } catch (e) { $("gallery").textContent = e.message; }
}

function draw(recognitions) {
  const canvas = $("view"), scale = Math.min(1, 900 / image.width);
  canvas.width = Math.round(image.width * scale); canvas.height = Math.round(image.height * scale);
  canvas.style.display = "block";
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 3; ctx.font = "bold 15px sans-serif";
  recognitions.forEach((r, i) => {
    const [x1, y1, x2, y2] = r.box.map((v) => v * scale);
    ctx.strokeStyle = BOX; ctx.strokeRect(x1 + 1.5, y1 + 1.5, Math.max(1, x2 - x1 - 3), Math.max(1, y2 - y1 - 3));
    const text = (i + 1) + " " + r.label + " " + r.score.toFixed(2);
    const w = ctx.measureText(text).width + 8, top = y1 > 20 ? y1 - 20 : y1 + 3;
    ctx.fillStyle = BOX; ctx.fillRect(x1 + 3, top, w, 19);
    ctx.fillStyle = "#fff"; ctx.fillText(text, x1 + 7, top + 15);
  });
}

function table(recognitions) {
  const body = $("results").querySelector("tbody");
  body.innerHTML = "";
  recognitions.forEach((r, i) => {
    const row = body.insertRow();
    [String(i + 1), r.label, r.score.toFixed(3), r.matches.slice(1).map((m) => m.label + " " + m.score.toFixed(2)).join(", ")]
      .forEach((t) => { row.insertCell().textContent = t; });
    const add = document.createElement("button");
    add.textContent = "add this crop"; add.onclick = () => addToGallery(r.box);
    row.insertCell().appendChild(add);
  });
  $("results").hidden = recognitions.length === 0;
}

async function recognise(file) {
  photo = file; $("add-photo").disabled = false;
  image = new Image();
  image.src = URL.createObjectURL(file);
  await image.decode().catch(() => null);
  say("recognising " + file.name + "...");
  const form = new FormData(); form.append("file", file, file.name);
  try {
    const doc = await call("/recognise", {method: "POST", body: form, headers: headers()});
    const recognitions = doc.images[0].recognitions;
    if (image.width) draw(recognitions);
    table(recognitions);
    say(recognitions.length ? recognitions.length + " found in " + file.name : "nothing recognised in " + file.name);
    document.body.dataset.recognised = String(recognitions.length);
  } catch (e) { say(e.message, true); document.body.dataset.recognised = "error"; }
}

async function addToGallery(box) {
  const label = $("label").value.trim();
  if (!label) { say("type a label first", true); $("label").focus(); return; }
  const form = new FormData(); form.append("file", photo, photo.name); form.append("label", label);
  if (box) form.append("box", box.join(","));
  try {
    const done = await call("/gallery/add", {method: "POST", body: form, headers: headers()});
    say(done.added.length ? "added to " + label + " (generation " + done.generation + ")"
        : "already in the gallery: " + (done.duplicates[0] || {}).reason);
    gallery();
  } catch (e) { say(e.message, true); }
}

$("file").onchange = (e) => { if (e.target.files[0]) recognise(e.target.files[0]); };
$("add-photo").onclick = () => addToGallery(null);
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) recognise(e.dataTransfer.files[0]); };
$("token").value = localStorage.getItem("shitu-token") || "";
gallery();
</script>
</body>
</html>
""".replace("__BOX_COLOUR__", BOX_COLOUR)
