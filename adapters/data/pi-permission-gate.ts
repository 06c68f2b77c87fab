// moorline's permission gate for pi (loaded with `pi --mode rpc --no-extensions -e <this file>`).
//
// Every tool call waits for a person: it becomes an `extension_ui_request` (method `confirm`,
// title `Run <tool>?`, message: the tool's input as JSON, at most 400 characters) that any
// client of the moorline session can answer with `extension_ui_response`. No answer, or "no",
// blocks the call and the model is told it was denied.

export default function (pi: any) {
  pi.on("tool_call", async (event: any, ctx: any) => {
    let input = "";
    try {
      input = JSON.stringify(event.input ?? {});
    } catch {
      input = String(event.input);
    }
    if (input.length > 400) {
      input = input.slice(0, 399) + "…";
    }
    const ok = await ctx.ui.confirm(`Run ${event.toolName}?`, input);
    if (!ok) {
      return { block: true, reason: "denied by remote user" };
    }
    return undefined;
  });
}
