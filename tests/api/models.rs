use crate::helpers::*;
use serde_json::{json, Value};

#[tokio::test]
async fn upload_each_format_list_inspect_delete() {
    let app = spawn_app().await;
    // Raw body, ONNX.
    let onnx = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    assert_eq!(onnx["format"], "onnx");
    assert_eq!(onnx["tensor_count"], 8);
    assert_eq!(onnx["parameter_count"], 5998);
    assert_eq!(onnx["size_bytes"], 26454);
    assert_eq!(
        onnx["sha256"],
        "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"
    );
    // Multipart, safetensors; the name comes from the file name; the format from content.
    let bytes = case_file("silero_vad/silero_vad_16k.safetensors");
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes).file_name("weights.bin"),
    );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let st: Value = r.json().await.unwrap();
    assert_eq!(st["format"], "safetensors");
    assert_eq!(st["name"], "weights.bin");
    assert_eq!(st["tensor_count"], 15);
    assert_eq!(st["parameter_count"], 309_633);
    // .npz with a misleading name.
    let npz = app
        .upload(
            case_file("digits_mlp_control/digits_mlp_weights.npz"),
            "x.onnx",
        )
        .await;
    assert_eq!(npz["format"], "npz");
    assert_eq!(npz["parameter_count"], 50_826);

    let (s, list) = app.get_json("/v1/models?limit=2").await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert_eq!(list["items"][0]["id"], npz["id"], "newest first");
    let cursor = list["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = app
        .get_json(&format!("/v1/models?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["items"][0]["id"], onnx["id"]);

    let (s, t) = app
        .get_json(&format!(
            "/v1/models/{}/tensors",
            onnx["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, 200);
    let items = t["items"].as_array().unwrap();
    let find = |n: &str| items.iter().find(|i| i["name"] == n).unwrap().clone();
    assert_eq!(find("Parameter87")["role"], "weight");
    assert_eq!(find("Parameter87")["shape"], json!([16, 8, 5, 5]));
    assert_eq!(find("Parameter6")["role"], "bias");
    assert_eq!(find("Parameter193_reshape1_shape")["dtype"], "int64");
    assert_eq!(find("Parameter193_reshape1_shape")["role"], "other");

    let id = npz["id"].as_str().unwrap();
    let (s, one) = app.get_json(&format!("/v1/models/{id}")).await;
    assert_eq!((s, one["id"].clone()), (200, npz["id"].clone()));
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, v) = app.get_json(&format!("/v1/models/{id}")).await;
    assert_eq!((s, error_code(&v)), (404, "model_not_found"));
    let (s, v) = app.get_json("/v1/models/not-a-uuid").await;
    assert_eq!((s, error_code(&v)), (404, "model_not_found"));
    app.stop().await;
}

#[tokio::test]
async fn upload_over_the_limit_is_413_and_leaves_nothing() {
    let app = spawn_app_with(|c| c.max_upload_bytes = 10_000).await;
    let r = app
        .client
        .post(app.url("/v1/models"))
        .body(case_file("mnist8/mnist-8.onnx"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "payload_too_large");
    let staged: Vec<_> = std::fs::read_dir(app.dir.path().join("data/tmp"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "partial upload left behind: {staged:?}");
    let (_, list) = app.get_json("/v1/models").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    // Multipart too.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(vec![7u8; 20_000]).file_name("big"),
    );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    app.stop().await;
}

#[tokio::test]
async fn model_in_use_cannot_be_deleted() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let id = m["id"].as_str().unwrap();
    let r = app.submit(json!({"model_id": id, "preset": "int8"})).await;
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "model_in_use");
    app.drain().await;
    // Finished: the job's artifacts are what the user came for; the model stays unless
    // they go with it (issue 30 item 9).
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "model_has_jobs");
    assert!(
        v["error"]["message"].as_str().unwrap().starts_with("1 job"),
        "{v}"
    );
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}?cascade=yes")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Asked for: deleting removes the model, its jobs and their artifact files.
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}?cascade=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert!(jobs["items"].as_array().unwrap().is_empty());
    let blobs = walk(&app.dir.path().join("data/blobs"));
    assert!(blobs.is_empty(), "blobs left: {blobs:?}");
    app.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Datasets: an .npz in the cases' convention is stored with its arrays, rows and labels;
/// anything else is a 422 `invalid_dataset` that stores nothing; delete removes it.
#[tokio::test]
async fn datasets_are_uploaded_listed_inspected_and_deleted() {
    let app = spawn_app().await;
    let post = |body: Vec<u8>, name: &'static str| {
        app.client
            .post(app.url(&format!("/v1/datasets?name={name}")))
            .body(body)
            .send()
    };
    let r = post(case_file("mnist8/eval.npz"), "mnist-eval.npz")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["name"], "mnist-eval.npz");
    assert_eq!(d["rows"], 2000);
    assert_eq!(d["has_labels"], true);
    assert_eq!(
        d["arrays"],
        json!([{"name": "Input3", "dtype": "float32", "shape": [2000, 1, 28, 28]}])
    );
    // silero's eval data is fed whole: its arrays do not share axis 0.
    let r = post(case_file("silero_vad/eval.npz"), "vad.npz")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let vad: Value = r.json().await.unwrap();
    assert_eq!(
        (vad["rows"].clone(), vad["has_labels"].clone()),
        (Value::Null, json!(false))
    );
    // Not an .npz, labels that are not int64, labels without matching rows: refused.
    let bad_labels = python(
        "import io,sys,numpy as np\nb=io.BytesIO();np.savez(b,X=np.zeros((4,2),np.float32),labels=np.zeros(4,np.float32));sys.stdout.write(b.getvalue().hex())",
        &[],
    );
    let short_labels = python(
        "import io,sys,numpy as np\nb=io.BytesIO();np.savez(b,X=np.zeros((4,2),np.float32),labels=np.zeros(3,np.int64));sys.stdout.write(b.getvalue().hex())",
        &[],
    );
    for (body, says) in [
        (case_file("mnist8/mnist-8.onnx"), ""),
        (
            hex::decode(bad_labels.trim()).unwrap(),
            "labels must be int64",
        ),
        (hex::decode(short_labels.trim()).unwrap(), "3 labels"),
    ] {
        let r = post(body, "bad.npz").await.unwrap();
        assert_eq!(r.status(), 422);
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_code(&v), "invalid_dataset", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    let (s, page) = app.get_json("/v1/datasets").await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let url = format!("/v1/datasets/{}", d["id"].as_str().unwrap());
    let (s, one) = app.get_json(&url).await;
    assert_eq!((s, &one["sha256"]), (200, &d["sha256"]));
    let r = app.client.delete(app.url(&url)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (s, v) = app.get_json(&url).await;
    assert_eq!((s, error_code(&v)), (404, "dataset_not_found"));
    let (_, page) = app.get_json("/v1/datasets").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    app.stop().await;
}
