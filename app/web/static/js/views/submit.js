// Submit a job: a few common fields over a JSON spec. Empty fields keep the server's defaults;
// filled ones are written over the JSON at their path.

import { api, ApiError, formatDetail } from "../api.js";
import { el, fmtNumber, shortId } from "../util.js";

const FIELDS = [
  { path: "name", label: "Name", type: "text", placeholder: "a label for people" },
  { path: "dataset.kind", label: "Dataset", options: ["digits", "folder", "dataset"], placeholder: "digits" },
  { path: "dataset.id", label: "Data set (yours)", options: [], placeholder: "none" },
  { path: "dataset.path", label: "Folder path", type: "text", placeholder: "folder only, on the worker" },
  { path: "dataset.image_size", label: "Image size", type: "int", placeholder: "8" },
  { path: "dataset.channels", label: "Channels", options: ["1", "3"], placeholder: "1", int: true },
  { path: "model.preset", label: "Model", options: ["tiny", "ddpm-cifar10", "custom"], placeholder: "tiny" },
  { path: "training.steps", label: "Steps", type: "int", placeholder: "500" },
  { path: "training.batch_size", label: "Batch size", type: "int", placeholder: "64" },
  { path: "training.learning_rate", label: "Learning rate", type: "float", placeholder: "2e-4" },
  { path: "training.init_from.job", label: "Start from job", type: "text", placeholder: "none (a job id: fine-tune)" },
  { path: "training.checkpoint_every", label: "Checkpoint every", type: "int", placeholder: "500" },
  { path: "training.sample_every", label: "Samples every", type: "int", placeholder: "250" },
  { path: "evaluation.every", label: "FID every", type: "int", placeholder: "0 = none (tiny)" },
  { path: "diffusion.prediction", label: "Prediction", options: ["x0", "eps", "v"], placeholder: "x0" },
  {
    path: "diffusion.loss_weighting",
    label: "Loss weighting",
    options: ["none", "min_snr"],
    placeholder: "none",
  },
];

const DRAFT = "ddpm-jobs.draft-spec";

function inputFor(field) {
  const id = `field-${field.path.replaceAll(".", "-")}`;
  let input;
  if (field.options) {
    input = el(
      "select",
      { id, name: field.path },
      el("option", { value: "" }, `default (${field.placeholder})`),
      field.options.map((o) => el("option", { value: o }, o)),
    );
  } else {
    input = el("input", {
      id,
      name: field.path,
      type: "text",
      inputmode: field.type === "int" ? "numeric" : field.type === "float" ? "decimal" : undefined,
      placeholder: field.placeholder,
      autocomplete: "off",
    });
  }
  return { field, input, node: el("label", { class: "field", for: id }, el("span", {}, field.label), input) };
}

function setPath(obj, path, value) {
  const parts = path.split(".");
  let node = obj;
  for (const part of parts.slice(0, -1)) {
    if (typeof node[part] !== "object" || node[part] === null || Array.isArray(node[part])) node[part] = {};
    node = node[part];
  }
  node[parts[parts.length - 1]] = value;
}

/** Fill the data set picker with the user's ready data sets; picking one sets dataset.kind too. */
async function fillDatasetPicker(picker, kind, update) {
  picker.addEventListener("change", () => {
    if (picker.value) kind.value = "dataset";
    else if (kind.value === "dataset") kind.value = "";
    update();
  });
  try {
    const page = await api("/v1/datasets?status=ready&limit=200");
    for (const d of page.items) {
      const label = `${d.name || `data set ${shortId(d.id)}`} (${fmtNumber(d.image_count)} images)`;
      picker.append(el("option", { value: d.id }, label));
    }
    picker.firstChild.textContent = page.items.length ? "none (pick one of yours)" : "none ready yet";
  } catch {
    picker.firstChild.textContent = "could not list data sets";
  }
}

export function submitView(root) {
  const inputs = FIELDS.map(inputFor);
  const byPath = Object.fromEntries(inputs.map((i) => [i.field.path, i.input]));
  const textarea = el("textarea", { id: "spec-json", name: "spec", rows: 12, spellcheck: "false" });
  textarea.value = sessionStorage.getItem(DRAFT) || "{}";
  const preview = el("pre", { id: "spec-preview", class: "code" });
  const errors = el("div", { class: "error", id: "submit-errors", hidden: true });
  const submit = el("button", { type: "submit", id: "submit-job" }, "Submit job");

  /** The spec to send, or throws an Error saying what is wrong with the form. */
  function buildSpec() {
    let spec;
    try {
      spec = JSON.parse(textarea.value.trim() || "{}");
    } catch (e) {
      throw new Error(`The JSON spec does not parse: ${e.message}`);
    }
    if (typeof spec !== "object" || spec === null || Array.isArray(spec)) {
      throw new Error("The JSON spec must be an object, e.g. {}");
    }
    for (const { field, input } of inputs) {
      const raw = input.value.trim();
      if (!raw) continue;
      let value = raw;
      if (field.type === "int" || field.int) {
        if (!/^-?\d+$/.test(raw)) throw new Error(`${field.label}: a whole number, please`);
        value = Number(raw);
      } else if (field.type === "float") {
        value = Number(raw);
        if (!Number.isFinite(value)) throw new Error(`${field.label}: a number, please`);
      }
      setPath(spec, field.path, value);
    }
    return spec;
  }

  function update() {
    sessionStorage.setItem(DRAFT, textarea.value);
    try {
      preview.textContent = JSON.stringify(buildSpec(), null, 2);
      preview.classList.remove("invalid");
    } catch (e) {
      preview.textContent = e.message;
      preview.classList.add("invalid");
    }
  }

  async function onSubmit(event) {
    event.preventDefault();
    errors.hidden = true;
    let spec;
    try {
      spec = buildSpec();
    } catch (e) {
      showErrors(e.message);
      return;
    }
    submit.disabled = true;
    submit.textContent = "Submitting…";
    try {
      const job = await api("/v1/jobs", { method: "POST", body: spec });
      sessionStorage.removeItem(DRAFT);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      const what = e instanceof ApiError ? `The API refused the spec (${e.status}):` : "Could not submit:";
      showErrors(what, e instanceof ApiError ? formatDetail(e.detail) : e.message);
    } finally {
      submit.disabled = false;
      submit.textContent = "Submit job";
    }
  }

  function showErrors(title, lines = "") {
    errors.replaceChildren(
      el("strong", {}, title),
      lines ? el("ul", {}, lines.split("\n").map((l) => el("li", {}, l))) : null,
    );
    errors.hidden = false;
  }

  const form = el(
    "form",
    { id: "submit-form", class: "card", novalidate: true, onsubmit: onSubmit, oninput: update, onchange: update },
    el("div", { class: "card-head" }, el("h1", {}, "New training job")),
    el(
      "p",
      { class: "muted" },
      "Every field is optional: empty ones keep the defaults (shown greyed). ",
      "Filled fields are written over the JSON spec below.",
    ),
    el("div", { class: "grid-fields" }, inputs.map((i) => i.node)),
    el(
      "div",
      { class: "two-col" },
      el(
        "label",
        { class: "field", for: "spec-json" },
        el("span", {}, "JSON spec (any field of the job spec)"),
        textarea,
      ),
      el("div", { class: "field" }, el("span", {}, "Will be sent"), preview),
    ),
    errors,
    el(
      "div",
      { class: "actions" },
      submit,
      el("a", { class: "button secondary", href: "/docs#/jobs/create_job", target: "_blank" }, "Spec reference"),
    ),
  );
  root.replaceChildren(form);
  update();
  fillDatasetPicker(byPath["dataset.id"], byPath["dataset.kind"], update);
  return () => {};
}
