// The dashboard's entry: the API key, then a hash router over three views.
//   #/            the job list
//   #/new         the submit form
//   #/jobs/{id}   one job
//   #/datasets    the data sets: upload, status, preview, delete
// `#key=...` (as `ddpm-jobs serve` prints it) is taken into localStorage and removed from the address.

import { adoptKeyFromHash, forgetKey, getKey, setKey } from "./api.js";
import { el } from "./util.js";
import { datasetsView } from "./views/datasets.js";
import { jobView } from "./views/job.js";
import { listView } from "./views/list.js";
import { submitView } from "./views/submit.js";

const view = document.getElementById("view");
const forgetButton = document.getElementById("forget-key");
let cleanup = () => {};
let keyMessage = "";

function keyPrompt() {
  const input = el("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    placeholder: "ddpm_…",
    required: true,
  });
  const form = el(
    "form",
    {
      class: "card key-prompt",
      id: "key-form",
      onsubmit: (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        setKey(key);
        keyMessage = "";
        route();
      },
    },
    el("h1", {}, "API key"),
    keyMessage ? el("p", { class: "error" }, keyMessage) : null,
    el(
      "p",
      { class: "muted" },
      "The dashboard calls the API with your key. ",
      el("code", {}, "ddpm-jobs serve"),
      " prints a link that carries it; ",
      el("code", {}, "ddpm-jobs keys create --user NAME"),
      " makes a new one. It is kept in this browser only.",
    ),
    el("label", { class: "field", for: "api-key" }, el("span", {}, "Key"), input),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Use this key")),
  );
  view.replaceChildren(form);
  input.focus();
  return () => {};
}

function route() {
  cleanup();
  adoptKeyFromHash();
  const hash = location.hash || "#/";
  const hasKey = Boolean(getKey());
  forgetButton.hidden = !hasKey;
  for (const a of document.querySelectorAll("[data-nav]")) {
    const active =
      (a.dataset.nav === "new" && hash === "#/new") ||
      (a.dataset.nav === "list" && hash === "#/") ||
      (a.dataset.nav === "datasets" && hash === "#/datasets");
    a.classList.toggle("active", active);
  }
  if (!hasKey) {
    document.title = "ddpm-jobs";
    cleanup = keyPrompt();
    return;
  }
  const job = hash.match(/^#\/jobs\/([0-9a-fA-F-]{8,64})$/);
  if (job) {
    cleanup = jobView(view, job[1]);
  } else if (hash === "#/datasets") {
    document.title = "Data sets · ddpm-jobs";
    cleanup = datasetsView(view);
  } else if (hash === "#/new") {
    document.title = "New job · ddpm-jobs";
    cleanup = submitView(view);
  } else {
    document.title = "Jobs · ddpm-jobs";
    cleanup = listView(view);
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("ddpm:unauthorized", (event) => {
  const hadKey = Boolean(getKey());
  forgetKey();
  keyMessage = hadKey ? `The API refused the key: ${event.detail}` : "";
  route();
});
forgetButton.addEventListener("click", () => {
  forgetKey();
  keyMessage = "";
  route();
});

route();
